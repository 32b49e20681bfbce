"""AdaWarm's measured warmup (``warmup_steps="measured"``): the rule, and each execution's step
against plain AdaWarm stepped at the rate the rule gives."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ODD_SHAPES, TOLERANCES, assert_close, make_params
from kernel_cases import (
    assert_same_params_and_state,
    optimizer_trajectory,
    reference_trajectory,
    schedule_free_trajectory,
)
from promises import EXECUTIONS, device_of

from adawarm import AdaWarm
from adawarm.kernels import common, measured
from adawarm.kernels.measured import kernel_factors
from adawarm.schedule import MEASURED_CAP, measured_factor

# fp64 parameters, which only the torch backend takes, keep fp64 sums (the promise matrix,
# tests/test_promises.py, runs the measured warmup in fp32 on every execution).
CASES = [(execution, torch.float64) for execution in ("reference", "foreach", "fused")]
HYPER = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
# A rate the cap holds back for several steps, then releases; with a scheduler's changes.
RATES = (0.05, 0.05, 0.04, 0.05, 0.03, 0.05, 0.02, 0.05, 0.05)


def test_the_factor_caps_the_relative_update_at_the_rate_it_is_applied_to():
    # rho = lr sqrt(update_sq / param_sq) = 0.1 * sqrt(4 / 100) = 0.02
    assert measured_factor(0.1, 4.0, 100.0) == pytest.approx(MEASURED_CAP / 0.02, rel=1e-15)
    assert measured_factor(0.1 * MEASURED_CAP / 0.02, 4.0, 100.0) == pytest.approx(1.0)  # at it
    assert measured_factor(0.001, 4.0, 100.0) == 1.0  # below it
    assert measured_factor(0.1, 0.0, 100.0) == 1.0  # nothing moved
    assert measured_factor(0.1, 4.0, 0.0) == 1.0  # a norm of 0: as LAMB, the full rate
    assert measured_factor(0.0, 4.0, 100.0) == 1.0


@pytest.mark.parametrize("lr", [0.0, 1e-4, 0.1, 3.0])
def test_the_kernels_factor_is_the_schedules(lr):
    sums = torch.tensor(
        [[4.0, 100.0], [0.0, 100.0], [4.0, 0.0], [1025.0, 3.5], [1e-12, 1e6]], dtype=torch.float64
    )
    factors = kernel_factors(lr, sums.to(device_of("Triton")), MEASURED_CAP).cpu()
    expected = [measured_factor(lr, *row) for row in sums.tolist()]
    torch.testing.assert_close(factors, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0)


def gradients(shapes, dtype, steps):
    generator = torch.Generator().manual_seed(7)
    return [
        [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]
        for _ in range(steps)
    ]


def measured_by_hand(params, grads, rectify):
    """Plain AdaWarm (no ramp) at each step's rate times the factor that the relative updates
    measured here give: the first from Adam's first step (every element moves by the rate),
    then each from the last step's move divided by the rate it applied."""
    optimizer = AdaWarm(params, lr=RATES[0], warmup_steps=0, rectify=rectify, **HYPER)
    update_sq = float(sum(p.numel() for p in params))
    param_sq = sum(float(p.detach().double().square().sum()) for p in params)
    for rate, step_grads in zip(RATES, grads, strict=False):
        applied = rate * measured_factor(rate, update_sq, param_sq)
        optimizer.param_groups[0]["lr"] = applied
        before = [p.detach().clone() for p in params]
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        moved = [(p.detach() - b).double() / applied for p, b in zip(params, before, strict=True)]
        update_sq = sum(float(m.square().sum()) for m in moved)
        param_sq = sum(float(b.double().square().sum()) for b in before)
    return optimizer, update_sq, param_sq


def measured_steps(params, grads, rectify, execution, after_step=None):
    optimizer = AdaWarm(
        params, lr=RATES[0], warmup_steps="measured", rectify=rectify, **HYPER, **execution
    )
    for index, (rate, step_grads) in enumerate(zip(RATES, grads, strict=False)):
        optimizer.param_groups[0]["lr"] = rate
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        if after_step is not None:
            optimizer = after_step(index, optimizer) or optimizer
    return optimizer


@pytest.mark.parametrize(("execution", "dtype"), CASES, ids=str)
@pytest.mark.parametrize("rectify", [False, True], ids=["no rectification", "rectify"])
def test_a_measured_step_is_plain_adawarm_at_the_measured_rate(execution, dtype, rectify):
    shapes = list(ODD_SHAPES)  # 0, 1, 1023, 1025 elements ...
    device = device_of(execution)
    grads = [[g.to(device) for g in step] for step in gradients(shapes, dtype, len(RATES))]
    mine = [p.detach().to(device).requires_grad_() for p in make_params(shapes, dtype, 3)]
    theirs = make_params(shapes, dtype, 3)
    measured = measured_steps(mine, grads, rectify, EXECUTIONS[execution])
    plain, update_sq, param_sq = measured_by_hand(
        theirs, [[g.cpu() for g in s] for s in grads], rectify
    )
    # the kernel reads its entries on the parameters' device, the torch backend on the CPU
    entry_device = device if execution == "Triton" else torch.device("cpu")
    for index, (param, other) in enumerate(zip(mine, theirs, strict=True)):
        assert_close(param.detach().cpu(), other.detach(), dtype, f"param {index}")
        state, reference = measured.state[param], plain.state[other]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "relative_update"}
        assert float(state["step"]) == float(reference["step"]) == len(RATES)
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(state[key].cpu(), reference[key], dtype, f"{key} of param {index}")
        entry = state["relative_update"]
        assert entry.dtype == dtype and entry.shape == (2,) and entry.device == entry_device
    sums = torch.stack([measured.state[p]["relative_update"].cpu() for p in mine]).sum(0).double()
    # a move is a difference of parameters: their relative error over the relative update (at
    # most the cap)
    rtol = TOLERANCES[dtype][0] / MEASURED_CAP
    expected = torch.tensor([update_sq, param_sq], dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=rtol, atol=0)
    # the factor the next step applies
    (factor,) = measured.warmup_factor()
    expected_factor = measured_factor(RATES[-1], update_sq, param_sq) * _rectification(rectify)
    assert factor == pytest.approx(expected_factor, rel=rtol)


def _rectification(rectify: bool) -> float:
    from adawarm.schedule import rectification

    return rectification(len(RATES) + 1, HYPER["betas"][1]) if rectify else 1.0


def test_the_first_step_is_capped_from_the_parameters_alone():
    params = make_params([(40, 30)], torch.float64, 0)
    optimizer = AdaWarm(params, lr=0.1, warmup_steps="measured", weight_decay=0.0, eps=1e-15)
    rho = 0.1 * math.sqrt(params[0].numel()) / float(params[0].detach().norm())
    (factor,) = optimizer.warmup_factor()
    assert factor == pytest.approx(MEASURED_CAP / rho, rel=1e-12) and factor < 0.1
    before = params[0].detach().clone()
    params[0].grad = torch.randn_like(before)
    optimizer.step()  # Adam's first step: every element moves by the rate
    moved = (params[0].detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.1 * factor), rtol=1e-9, atol=0)


def test_a_checkpoint_without_measurements_starts_measuring_from_its_parameters():
    params = make_params([(20, 10)], torch.float32, 2)
    trained = AdaWarm(params, lr=0.01)
    params[0].grad = torch.ones_like(params[0])
    trained.step()
    measured = AdaWarm(params, lr=0.01, warmup_steps="measured")
    saved = trained.state_dict()
    saved["param_groups"][0]["warmup_steps"] = "measured"
    measured.load_state_dict(saved)
    assert "relative_update" not in measured.state[params[0]]
    measured.step()
    assert "relative_update" in measured.state[params[0]]
    back = AdaWarm(params, lr=0.01, warmup_steps=0)  # a group that does not measure drops it
    saved = measured.state_dict()
    saved["param_groups"][0]["warmup_steps"] = 0
    back.load_state_dict(saved)
    assert "relative_update" not in back.state[params[0]]


def test_a_malformed_measurement_in_a_checkpoint_is_refused_and_nothing_loads():
    params = make_params([(5,)], torch.float32, 2)
    optimizer = AdaWarm(params, warmup_steps="measured")
    params[0].grad = torch.ones(5)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["relative_update"] = torch.zeros(3)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match="relative_update of parameter 0 is"):
        optimizer.load_state_dict(saved)
    after = optimizer.state_dict()
    assert torch.equal(after["state"][0]["relative_update"], before["state"][0]["relative_update"])


# What the kernels are checked against the torch backend with: odd sizes and block edges, past
# the rectification threshold.
KERNEL_SHAPES = [(0,), (1,), (1023,), (1025,), (3, 5)]
KERNEL_OPTIONS = {
    "lr": 0.05,
    "betas": (0.9, 0.99),
    "eps": 1e-8,
    "weight_decay": 0.1,
    "warmup_steps": "measured",
    "rectify": True,
    "maximize": False,
    "rounding_seed": 5,
}
STORAGES = [
    (torch.float32, {}),
    (torch.float32, {"state_dtype": torch.bfloat16}),
    (torch.bfloat16, {"compensation": "stochastic"}),
    (torch.bfloat16, {"compensation": "kahan", "state_dtype": torch.bfloat16}),
    (torch.float16, {"compensation": "kahan"}),
]


@pytest.mark.parametrize(("dtype", "storage"), STORAGES, ids=str)
def test_the_kernel_measures_what_the_torch_backend_and_the_reference_do(dtype, storage):
    shapes = KERNEL_SHAPES
    options = {**KERNEL_OPTIONS, **storage}
    device = device_of("Triton")
    run = (shapes, dtype, options, 9, {4}, 6)  # a skipped step, a reload
    kernel = optimizer_trajectory("triton", *run, device)
    backend = optimizer_trajectory("torch", *run, torch.device("cpu"))
    reference = reference_trajectory(shapes, dtype, options, 9, {4})
    assert all("relative_update" in state for state in kernel[1])
    assert_same_params_and_state(kernel, backend, dtype)
    assert_same_params_and_state(kernel, reference, dtype)


@pytest.mark.parametrize(("dtype", "storage"), STORAGES, ids=str)
def test_the_schedule_free_kernel_measures_what_the_torch_backend_does(dtype, storage):
    shapes = KERNEL_SHAPES
    options = {**KERNEL_OPTIONS, **storage}
    run = {"inf_steps": {4}, "reload_at": 6, "evaluate_at": 2}  # a skipped step, a reload
    kernel = schedule_free_trajectory({"backend": "triton"}, shapes, dtype, options, 9, **run)
    backend = schedule_free_trajectory({"backend": "torch"}, shapes, dtype, options, 9, **run)
    reference = schedule_free_trajectory(
        {"backend": "torch", "foreach": False}, shapes, dtype, options, 9, **run
    )
    assert all("relative_update" in state for state in kernel[1])
    assert_same_params_and_state(kernel, backend, dtype)
    assert_same_params_and_state(kernel, reference, dtype)


def test_each_tensors_sums_are_its_blocks_parts_in_order(monkeypatch):
    # A few parts a chunk, so that a tensor's parts span several chunks (as a tensor of more
    # than 2^20 elements does with the launcher's chunk), and tensors of one program.
    monkeypatch.setattr(measured, "SUMS_CHUNK", 2)
    device = device_of("Triton")
    numels = [5 * common.BLOCK_SIZE - 3, 1, 0, 3 * common.BLOCK_SIZE]
    entries = [torch.full((2,), -1.0, device=device) for _ in numels]
    block_tensors, _ = common.block_tables(numels, device)
    tables = {
        "numels": torch.tensor(numels, device=device),
        "block_tensors": block_tensors,
        "relative_update_ptrs": torch.tensor([e.data_ptr() for e in entries], device=device),
        "block_size": common.BLOCK_SIZE,
    }
    tables.update(measured.measured_scratch(tables))
    parts = torch.rand(block_tensors.numel(), 2, generator=torch.Generator().manual_seed(0))
    tables["partials"].copy_(parts.reshape(-1))
    measured.launch_measured_sums(tables, found_inf=None)
    expected = torch.zeros(len(numels), 2).index_add_(0, block_tensors.cpu().long(), parts)
    torch.testing.assert_close(torch.stack(entries).cpu(), expected)
