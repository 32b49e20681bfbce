"""AdaWarm in its limits equals torch.optim.AdamW, RAdam and AdamW with a linear warmup."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ODD_SHAPES,
    assert_same_trajectory_state,
    gradient_stream,
    make_params,
    train,
)
from hypothesis import given
from hypothesis import strategies as st

from adawarm import AdaWarm

STEPS = 14  # past t = 6, where rectification starts for beta2 = 0.999


def compare(make_adawarm, make_torch, shapes, dtype, steps, seed, make_scheduler=None):
    grads = gradient_stream(shapes, dtype, steps, seed)
    mine = make_params(shapes, dtype, seed)
    theirs = make_params(shapes, dtype, seed)
    opt_mine = make_adawarm(mine)
    opt_theirs = make_torch(theirs)
    scheduler = make_scheduler(opt_theirs) if make_scheduler else None
    train(opt_mine, mine, grads)
    train(opt_theirs, theirs, grads, after_step=(lambda _: scheduler.step()) if scheduler else None)
    assert_same_trajectory_state(opt_mine, mine, opt_theirs, theirs, dtype)


hyper_parameters = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.1),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.8, 0.9999)),
        "eps": st.floats(1e-10, 1e-3),
        "weight_decay": st.floats(0.0, 0.5),
        "maximize": st.booleans(),
    }
)
shape_lists = st.lists(
    st.one_of(
        st.sampled_from(ODD_SHAPES),
        st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    ),
    min_size=1,
    max_size=6,
)
dtypes = st.sampled_from([torch.float32, torch.float64])


def adamw_limit(hp):
    return (
        lambda ps: AdaWarm(ps, **hp, rectify=False, warmup_steps=0, backend="torch"),
        lambda ps: torch.optim.AdamW(ps, **hp),
    )


def radam_limit(hp):
    return (
        lambda ps: AdaWarm(ps, **hp, rectify=True, warmup_steps=0, backend="torch"),
        lambda ps: torch.optim.RAdam(ps, **hp, decoupled_weight_decay=True),
    )


@given(hp=hyper_parameters, shapes=shape_lists, dtype=dtypes, steps=st.integers(12, 16))
def test_rectify_off_no_warmup_is_adamw(hp, shapes, dtype, steps):
    compare(*adamw_limit(hp), shapes, dtype, steps, seed=1)


@given(hp=hyper_parameters, shapes=shape_lists, dtype=dtypes, steps=st.integers(12, 16))
def test_rectify_on_no_warmup_is_radam(hp, shapes, dtype, steps):
    compare(*radam_limit(hp), shapes, dtype, steps, seed=2)


@given(
    hp=hyper_parameters,
    shapes=shape_lists,
    dtype=dtypes,
    steps=st.integers(12, 16),
    warmup=st.integers(1, 20),
)
def test_ramp_is_adamw_with_linear_warmup(hp, shapes, dtype, steps, warmup):
    compare(
        lambda ps: AdaWarm(ps, **hp, rectify=False, warmup_steps=warmup, backend="torch"),
        lambda ps: torch.optim.AdamW(ps, **hp),
        shapes,
        dtype,
        steps,
        seed=3,
        make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup)
        ),
    )


DEFAULT_HP = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("limit", [adamw_limit, radam_limit], ids=["adamw", "radam"])
def test_fixed_odd_shapes_match_torch(limit, dtype):
    compare(*limit(DEFAULT_HP), ODD_SHAPES, dtype, STEPS, seed=4)


@pytest.mark.parametrize("limit", [adamw_limit, radam_limit], ids=["adamw", "radam"])
def test_complex_parameters_match_torch(limit):
    shapes = [(7,), (3, 5)]
    grads = gradient_stream(shapes, torch.complex64, STEPS, seed=5)
    mine = make_params(shapes, torch.complex64, seed=5)
    theirs = make_params(shapes, torch.complex64, seed=5)
    make_mine, make_theirs = limit(DEFAULT_HP)
    opt_mine, opt_theirs = make_mine(mine), make_theirs(theirs)
    train(opt_mine, mine, grads)
    train(opt_theirs, theirs, grads)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                opt_mine.state[a][key], opt_theirs.state[b][key], rtol=1e-5, atol=1e-6
            )


def test_parameters_without_gradients_are_skipped():
    params = make_params([(4,), (5,)], torch.float32, seed=6)
    frozen = params[1].detach().clone()
    opt = AdaWarm(params, lr=0.1, warmup_steps=0)
    params[0].grad = torch.ones(4)
    opt.step()
    assert torch.equal(params[1].detach(), frozen)
    assert params[1] not in opt.state or not opt.state[params[1]]
    assert float(opt.state[params[0]]["step"]) == 1.0


def test_tensor_lr_gives_the_float_lr_result():
    shapes = [(7,), (3, 5)]
    grads = gradient_stream(shapes, torch.float32, STEPS, seed=7)
    with_float, with_tensor = (
        make_params(shapes, torch.float32, 7),
        make_params(shapes, torch.float32, 7),
    )
    opt_float = AdaWarm(with_float, lr=1e-2, warmup_steps=4)
    opt_tensor = AdaWarm(with_tensor, lr=torch.tensor(1e-2), warmup_steps=4)
    train(opt_float, with_float, grads)
    train(opt_tensor, with_tensor, grads)
    assert_same_trajectory_state(opt_tensor, with_tensor, opt_float, with_float, torch.float32)


def test_defaults_are_a_ramp_of_min_50_and_two_over_one_minus_beta2_without_rectification():
    # The quality benchmark chose them (docs/defaults.md); beta2 = 0.8 makes the
    # ramp 2 / (1 - 0.8) = 10 steps, so the test runs past its end.
    shapes = [(7,), (3, 5)]
    grads = gradient_stream(shapes, torch.float32, STEPS, seed=8)
    mine, theirs = make_params(shapes, torch.float32, 8), make_params(shapes, torch.float32, 8)
    opt_mine = AdaWarm(mine, lr=1e-2, betas=(0.9, 0.8))
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.8))
    ramp = torch.optim.lr_scheduler.LambdaLR(opt_theirs, lambda s: min(1.0, (s + 1) / 10))
    train(opt_mine, mine, grads)
    train(opt_theirs, theirs, grads, after_step=lambda _: ramp.step())
    assert_same_trajectory_state(opt_mine, mine, opt_theirs, theirs, torch.float32)
