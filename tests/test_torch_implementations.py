"""The torch backend's implementations (reference, foreach, fused) agree with each other."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ODD_SHAPES,
    assert_close,
    gradient_stream,
    make_params,
    non_contiguous_randn,
)
from hypothesis import given
from hypothesis import strategies as st

from adawarm import adawarm
from adawarm.state import moment_like
from adawarm.torch_backend import IMPLEMENTATIONS

# How the functional API's torch.optim-style options select each implementation. fused=True
# refuses strided parameters (torch's fused kernel mis-updates them); the automatic choice runs
# the fused implementation, which sends them through foreach ops.
SELECT = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
SELECT_STRIDED = {**SELECT, "fused": {}}


def run_functional(implementation, shapes, dtype, steps, seed, options, strided_params=False):
    params = [p.detach() for p in make_params(shapes, dtype, seed)]
    if strided_params:
        generator = torch.Generator().manual_seed(seed)
        params = [non_contiguous_randn(p.shape, dtype, generator) for p in params]
    exp_avgs = [moment_like(p) for p in params]
    exp_avg_sqs = [moment_like(p) for p in params]
    state_steps = [torch.tensor(0.0) for _ in params]
    for grads in gradient_stream(shapes, dtype, steps, seed):
        adawarm(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            backend="torch",
            **(SELECT_STRIDED if strided_params else SELECT)[implementation],
            **options,
        )
    return params, exp_avgs, exp_avg_sqs, state_steps


def assert_implementations_agree(shapes, dtype, steps, options, strided_params=False):
    results = {
        name: run_functional(name, shapes, dtype, steps, 11, options, strided_params)
        for name in IMPLEMENTATIONS
    }
    expected = results["reference"]
    for name, actual in results.items():
        for kind, mine, ref in zip(
            ("param", "exp_avg", "exp_avg_sq"), actual[:3], expected[:3], strict=True
        ):
            for index, (a, b) in enumerate(zip(mine, ref, strict=True)):
                assert_close(a, b, dtype, f"{name} {kind} {index}")
        assert [float(s) for s in actual[3]] == [float(steps)] * len(shapes)


options_strategy = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.1),
        "beta1": st.floats(0.0, 0.99),
        "beta2": st.floats(0.8, 0.9999),
        "eps": st.floats(1e-10, 1e-3),
        "weight_decay": st.floats(0.0, 0.5),
        "warmup_steps": st.one_of(st.integers(0, 20), st.sampled_from(["untuned", "auto"])),
        "rectify": st.booleans(),
        "maximize": st.booleans(),
    }
)


@given(
    options=options_strategy,
    shapes=st.lists(st.sampled_from(ODD_SHAPES), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    steps=st.integers(1, 12),
)
def test_implementations_agree(options, shapes, dtype, steps):
    assert_implementations_agree(shapes, dtype, steps, options)


@pytest.mark.parametrize("strided_params", [False, True])
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_implementations_agree_on_odd_shapes_past_threshold(rectify, dtype, strided_params):
    options = {
        "lr": 1e-2,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.1,
        "warmup_steps": 5,
        "rectify": rectify,
        "maximize": False,
    }
    assert_implementations_agree(ODD_SHAPES, dtype, 12, options, strided_params)


@pytest.mark.parametrize(
    ("selection", "error", "message"),
    [
        ({"foreach": "yes"}, TypeError, "Invalid foreach: 'yes', expected None, True or False"),
        ({"foreach": True, "fused": True}, ValueError, "foreach=True with fused=True"),
        ({"fused": False, "backend": "triton"}, ValueError, "fused=False with backend='triton'"),
    ],
)
def test_contradictory_or_bad_selections_are_refused(selection, error, message):
    options = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    options |= {"warmup_steps": 0, "rectify": False}
    params = [torch.zeros(3)]
    with pytest.raises(error, match=message):
        adawarm(
            params,
            [torch.ones(3)],
            [torch.zeros(3)],
            [torch.zeros(3)],
            [torch.tensor(0.0)],
            **options,
            **selection,
        )
