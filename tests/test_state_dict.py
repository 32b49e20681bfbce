"""state_dict interchange with torch's optimizers, resuming, and reproducibility."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    ODD_SHAPES,
    assert_bit_identical,
    assert_same_trajectory_state,
    gradient_stream,
    make_params,
    train,
)

from adawarm import AdaWarm

HP = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
SHAPES = ODD_SHAPES
STEPS = 14


def test_adamw_state_dict_loads_and_training_continues_like_adamw():
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=21)
    reference = make_params(SHAPES, torch.float32, seed=21)
    adamw = torch.optim.AdamW(reference, **HP)
    train(adamw, reference, grads[:5])

    params = [p.detach().clone().requires_grad_() for p in reference]
    adawarm = AdaWarm(params, **HP, rectify=False, warmup_steps=0)
    adawarm.load_state_dict(copy.deepcopy(adamw.state_dict()))
    train(adawarm, params, grads[5:])
    train(adamw, reference, grads[5:])
    assert_same_trajectory_state(adawarm, params, adamw, reference, torch.float32)
    assert adawarm.param_groups[0]["warmup_steps"] == 0
    assert adawarm.param_groups[0]["rectify"] is False


@pytest.mark.parametrize(
    ("rectify", "make_torch"),
    [
        (False, lambda ps: torch.optim.AdamW(ps, **HP)),
        (True, lambda ps: torch.optim.RAdam(ps, **HP, decoupled_weight_decay=True)),
        # RAdam constructed with its default (coupled) decay still reads the checkpoint's flag.
        (True, lambda ps: torch.optim.RAdam(ps, **HP)),
    ],
    ids=["adamw", "radam-decoupled", "radam-default"],
)
def test_adawarm_state_dict_loads_into_torch(rectify, make_torch):
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=22)
    params = make_params(SHAPES, torch.float32, seed=22)
    adawarm = AdaWarm(params, **HP, rectify=rectify, warmup_steps=0)
    train(adawarm, params, grads[:7])

    theirs = [p.detach().clone().requires_grad_() for p in params]
    torch_opt = make_torch(theirs)
    torch_opt.load_state_dict(copy.deepcopy(adawarm.state_dict()))
    train(adawarm, params, grads[7:])
    train(torch_opt, theirs, grads[7:])
    assert_same_trajectory_state(adawarm, params, torch_opt, theirs, torch.float32)


def test_two_runs_with_the_same_seed_are_bit_identical():
    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
        opt = AdaWarm(model.parameters(), lr=1e-2, warmup_steps=4, rectify=True)
        for _ in range(STEPS):
            loss = model(torch.randn(8, 9)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    first, first_opt = run()
    second, second_opt = run()
    assert_bit_identical(first, second)
    for a, b in zip(first_opt.state.values(), second_opt.state.values(), strict=True):
        assert_bit_identical(
            [a["exp_avg"], a["exp_avg_sq"], a["step"]], [b["exp_avg"], b["exp_avg_sq"], b["step"]]
        )


def with_number_steps(state_dict):
    """A checkpoint as older torch versions wrote it: ``step`` a Python number."""
    saved = copy.deepcopy(state_dict)
    for state in saved["state"].values():
        state["step"] = float(state["step"])
    return saved


def test_checkpoints_with_number_steps_load_and_train_on():
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=26)
    reference = make_params(SHAPES, torch.float32, seed=26)
    adamw = torch.optim.AdamW(reference, **HP)
    train(adamw, reference, grads[:5])

    params = [p.detach().clone().requires_grad_() for p in reference]
    adawarm = AdaWarm(params, **HP, rectify=False, warmup_steps=0)
    adawarm.load_state_dict(with_number_steps(adamw.state_dict()))
    assert all(state["step"].dtype == torch.float32 for state in adawarm.state.values())
    train(adawarm, params, grads[5:])
    train(adamw, reference, grads[5:])
    assert_same_trajectory_state(adawarm, params, adamw, reference, torch.float32)


@pytest.mark.parametrize("bad_step", [2.5, -1.0, float("nan"), "3"])
def test_checkpoints_with_impossible_steps_are_refused(bad_step):
    params = make_params([(4,)], torch.float32, seed=27)
    opt = AdaWarm(params)
    params[0].grad = torch.ones(4)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = bad_step
    with pytest.raises((ValueError, TypeError), match="Loaded step of parameter 0"):
        AdaWarm(params).load_state_dict(saved)


def group_keys(state_dict):
    return [sorted(group) for group in state_dict["param_groups"]]


def state_keys(state_dict):
    return {index: sorted(state) for index, state in state_dict["state"].items()}


def trained_adawarm(**options):
    params = make_params([(5,), (2, 3)], torch.float32, seed=28)
    opt = AdaWarm([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], **options)
    for param in params:
        param.grad = torch.ones_like(param)
    opt.step()
    return params, opt


@pytest.mark.parametrize(
    "make_torch",
    [
        lambda ps: torch.optim.AdamW(ps, **HP),
        lambda ps: torch.optim.RAdam(ps, **HP, decoupled_weight_decay=True),
    ],
    ids=["adamw", "radam"],
)
def test_loading_a_torch_checkpoint_drops_the_keys_only_torch_uses(make_torch):
    params, mine = trained_adawarm()
    theirs = make_torch([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}])
    for param in params:
        param.grad = torch.ones_like(param)
    theirs.step()
    mine.load_state_dict(theirs.state_dict())
    assert group_keys(mine.state_dict()) == group_keys(trained_adawarm()[1].state_dict())
    for group in mine.param_groups:
        assert not {"amsgrad", "differentiable", "decoupled_weight_decay"} & set(group)


@pytest.mark.parametrize("steps_before", [5, 60])
def test_a_torch_checkpoint_counts_as_warmed_up(steps_before):
    grads = gradient_stream(SHAPES, torch.float32, steps_before + 8, seed=29)
    reference = make_params(SHAPES, torch.float32, seed=29)
    adamw = torch.optim.AdamW(reference, **HP)
    train(adamw, reference, grads[:steps_before])

    params = [p.detach().clone().requires_grad_() for p in reference]
    adawarm = AdaWarm(params, **HP)  # the default ramp: 50 steps for beta2 = 0.999
    adawarm.load_state_dict(copy.deepcopy(adamw.state_dict()))
    assert adawarm.param_groups[0]["warmup_steps"] == 0
    assert adawarm.effective_lr() == [HP["lr"]]
    train(adawarm, params, grads[steps_before:])
    train(adamw, reference, grads[steps_before:])
    assert_same_trajectory_state(adawarm, params, adamw, reference, torch.float32)


def test_an_untrained_torch_checkpoint_keeps_the_ramp():
    params = make_params(SHAPES, torch.float32, seed=30)
    adawarm = AdaWarm(params, **HP)
    adawarm.load_state_dict(torch.optim.AdamW(params, **HP).state_dict())
    assert adawarm.param_groups[0]["warmup_steps"] == "auto"


def test_an_amsgrad_checkpoint_is_refused():
    params = make_params(SHAPES, torch.float32, seed=31)
    saved = torch.optim.AdamW(params, amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad=True"):
        AdaWarm(params).load_state_dict(saved)
