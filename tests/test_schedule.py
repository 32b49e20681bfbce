"""The schedule module: ramp, rectification, and the per-step scalars every backend uses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adawarm import AdaWarm, step_schedule, warmup_factor
from adawarm.schedule import (
    SCHEDULE_FREE_RUN_FRACTION,
    ramp,
    rectification,
    resolve_schedule_free_warmup_steps,
    resolve_warmup_steps,
    rho,
    untuned_warmup_steps,
)


def test_ramp_is_linear_and_reaches_one_at_w():
    assert ramp(1, 4) == 0.25
    assert ramp(3, 4) == 0.75
    assert ramp(4, 4) == 1.0
    assert ramp(100, 4) == 1.0
    assert ramp(1, 0) == 1.0


def test_untuned_warmup_is_two_over_one_minus_beta2():
    assert untuned_warmup_steps(0.999) == 2000
    assert untuned_warmup_steps(0.99) == 200
    assert resolve_warmup_steps("untuned", 0.98) == 100


@pytest.mark.parametrize(
    ("beta2", "steps"), [(0.999, 50), (0.99, 50), (0.98, 50), (0.96, 50), (0.95, 40), (0.9, 20)]
)
def test_the_default_ramp_is_50_steps_or_the_untuned_length_where_shorter(beta2, steps):
    assert resolve_warmup_steps("auto", beta2) == steps


@pytest.mark.parametrize(
    ("beta2", "total_steps", "steps"),
    [(0.999, 3000, 150), (0.999, 300, 50), (0.999, 2000, 100), (0.95, 100, 40), (0.95, 1000, 50)],
)
def test_with_the_runs_length_the_default_ramp_lasts_5_percent_of_it_when_longer(
    beta2, total_steps, steps
):
    assert resolve_warmup_steps("auto", beta2, total_steps) == steps
    assert resolve_warmup_steps(7, beta2, total_steps) == 7  # an explicit length stays
    assert resolve_warmup_steps(7, 0.999) == 7


@pytest.mark.parametrize(
    ("beta2", "total_steps", "steps"),
    [
        (0.999, 3000, round(SCHEDULE_FREE_RUN_FRACTION * 3000)),
        (0.999, 300, round(SCHEDULE_FREE_RUN_FRACTION * 300)),  # no 50-step floor
        (0.95, 300, round(SCHEDULE_FREE_RUN_FRACTION * 300)),
        (0.999, None, 50),  # without the run's length: AdaWarm's
        (0.95, None, 40),
    ],
)
def test_the_schedule_free_default_ramp_is_a_fraction_of_the_run(beta2, total_steps, steps):
    assert resolve_schedule_free_warmup_steps("auto", beta2, total_steps) == steps
    assert resolve_schedule_free_warmup_steps(7, beta2, total_steps) == 7
    assert resolve_schedule_free_warmup_steps("untuned", beta2, total_steps) == (
        untuned_warmup_steps(beta2)
    )


def test_rho_and_rectification_match_the_reference_figures():
    # From shared/notes/reference-math.md: rho_5 = 4.996, first rectified step 6, r_6 = 0.0258.
    assert rho(5, 0.999) == pytest.approx(4.996, abs=5e-4)
    assert [t for t in range(1, 10) if rectification(t, 0.999) > 0] == [6, 7, 8, 9]
    assert rectification(6, 0.999) == pytest.approx(0.0258, abs=5e-5)
    assert rectification(5, 0.999) == 0.0


@given(step=st.integers(1, 10_000), beta2=st.floats(0.7, 0.9999))
def test_rectification_is_a_fraction_that_grows(step, beta2):
    r_t = rectification(step, beta2)
    assert 0.0 <= r_t <= 1.0
    assert rectification(step + 1, beta2) >= r_t


@given(
    step=st.integers(1, 5000),
    lr=st.floats(0.0, 1.0),
    beta1=st.floats(0.0, 0.999),
    beta2=st.floats(0.7, 0.9999),
    eps=st.floats(0.0, 1e-3),
    weight_decay=st.floats(0.0, 1.0),
    warmup=st.integers(0, 3000),
    rectify=st.booleans(),
)
def test_step_schedule_composes_ramp_and_rectification(
    step, lr, beta1, beta2, eps, weight_decay, warmup, rectify
):
    s = step_schedule(
        step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        warmup_steps=warmup,
        rectify=rectify,
    )
    r_t = rectification(step, beta2) if rectify else 1.0
    assert s.lr == lr * ramp(step, warmup)
    assert s.decay == 1.0 - s.lr * weight_decay
    assert s.adaptive == (r_t > 0)
    expected_size = s.lr * (r_t if r_t > 0 else 1.0) / (1.0 - beta1**step)
    assert s.step_size == pytest.approx(expected_size, rel=1e-12, abs=0.0)
    assert s.eps == pytest.approx(eps / math.sqrt(1 - beta2**step) if rectify else eps, rel=1e-12)
    assert s.warmup_factor == pytest.approx(ramp(step, warmup) * r_t, rel=1e-12)
    assert warmup_factor(step, beta2=beta2, warmup_steps=warmup, rectify=rectify) == s.warmup_factor


def test_warmup_factor_has_none_for_the_measured_warmup_before_the_run():
    with pytest.raises(ValueError, match="has no factor before the run"):
        warmup_factor(5, beta2=0.999, warmup_steps="measured", rectify=False)


def test_warmup_factor_refuses_step_zero():
    with pytest.raises(ValueError, match="Invalid step: 0"):
        warmup_factor(0, beta2=0.999, warmup_steps=0, rectify=True)


def test_optimizer_reports_the_multiplier_of_its_next_step_per_group():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = AdaWarm(
        [{"params": [a], "warmup_steps": 10, "rectify": False}, {"params": [b], "rectify": True}],
        warmup_steps=0,
    )
    assert opt.warmup_factor() == [0.1, 0.0]
    for _ in range(6):
        a.grad, b.grad = torch.ones(3), torch.ones(2)
        opt.step()
    assert opt.warmup_factor() == [
        pytest.approx(0.7),
        pytest.approx(rectification(7, 0.999)),
    ]
