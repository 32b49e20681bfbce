"""GradScaler's grad_scale/found_inf arguments on the torch backend."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_bit_identical, assert_close, gradient_stream, make_params

from adawarm import AdaWarm

SHAPES = [(7,), (3, 5), (1025,)]


@pytest.mark.parametrize("rectify", [False, True])
def test_grad_scale_unscales_inside_the_step(rectify):
    grads = gradient_stream(SHAPES, torch.float32, 10, seed=31)
    plain, scaled = make_params(SHAPES, torch.float32, 31), make_params(SHAPES, torch.float32, 31)
    opt_plain = AdaWarm(plain, lr=1e-2, warmup_steps=3, rectify=rectify)
    opt_scaled = AdaWarm(scaled, lr=1e-2, warmup_steps=3, rectify=rectify)
    scale = torch.tensor(1024.0)
    for step_grads in grads:
        for p, q, g in zip(plain, scaled, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g * scale
        opt_plain.step()
        opt_scaled.step(grad_scale=scale, found_inf=torch.tensor(0.0))
    for p, q in zip(plain, scaled, strict=True):
        assert_close(q.detach(), p.detach(), torch.float32, "param")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_close(opt_scaled.state[q][key], opt_plain.state[p][key], torch.float32, key)


def test_found_inf_changes_nothing_and_does_not_advance_the_warmup():
    params = make_params(SHAPES, torch.float32, 32)
    opt = AdaWarm(params, lr=1e-2, warmup_steps=5, rectify=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    factor = opt.warmup_factor()
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.step(found_inf=torch.tensor(1.0))
    assert_bit_identical([p.detach() for p in params], before[0])
    for key, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, before[1]["state"][key][name])
    assert opt.warmup_factor() == factor


def test_grad_scaler_loop_skips_inf_steps_without_advancing_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = AdaWarm(model.parameters(), lr=1e-2, warmup_steps=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    skipped = 0
    for step in range(8):
        loss = model(torch.randn(4, 6)).square().mean()
        if step in (2, 5):
            loss = loss * float("inf")
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        skipped += step in (2, 5)
    for p in model.parameters():
        assert float(opt.state[p]["step"]) == 8 - skipped
        assert torch.isfinite(p).all()
