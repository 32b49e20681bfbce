"""AdaWarmScheduleFree's Triton kernel, run by Triton's interpreter on CPU tensors (or on a GPU
when present), against its torch backend and the single-tensor reference."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close, count_calls
from hypothesis import assume, given
from hypothesis import strategies as st
from kernel_cases import (
    as_moments,
    assert_same_params_and_state,
    kernel_dtypes,
    schedule_free_trajectory,
    shape_lists,
)

from adawarm import AdaWarmScheduleFree
from adawarm.kernels import schedule_free_step
from adawarm.kernels.common import BLOCK_SIZE
from adawarm.schedule import schedule_free_step as reference_schedule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

schedule_free_options = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.1),
        "betas": st.tuples(st.floats(0.5, 0.99), st.floats(0.8, 0.9999)),
        "eps": st.floats(1e-10, 1e-3),
        "weight_decay": st.floats(0.0, 0.5),
        "warmup_steps": st.sampled_from([0, 1, 5, "untuned", "auto", "measured"]),
        "rectify": st.booleans(),
        "r": st.sampled_from([0.0, 0.5, 2.0]),
        "weight_lr_power": st.sampled_from([0.0, 1.0, 2.0]),
        "maximize": st.booleans(),
        "state_dtype": st.sampled_from([None, torch.bfloat16]),
        "compensation": st.sampled_from([None, "kahan", "stochastic"]),
        "rounding_seed": st.integers(0, 2**31 - 1),
    }
)


@given(
    options=schedule_free_options,
    shapes=shape_lists,
    dtype=kernel_dtypes,
    steps=st.integers(1, 12),
    inf_steps=st.sets(st.integers(0, 11), max_size=3),
    reload_at=st.integers(0, 11),
    evaluate_at=st.integers(0, 11),
)
def test_kernel_equals_torch_backend_and_reference(
    options, shapes, dtype, steps, inf_steps, reload_at, evaluate_at
):
    assume(not (dtype == torch.float16 and options["compensation"] == "stochastic"))
    run = {"inf_steps": inf_steps, "reload_at": reload_at, "evaluate_at": evaluate_at}
    kernel = schedule_free_trajectory({"backend": "triton"}, shapes, dtype, options, steps, **run)
    backend = schedule_free_trajectory({"backend": "torch"}, shapes, dtype, options, steps, **run)
    reference = schedule_free_trajectory(
        {"backend": "torch", "foreach": False}, shapes, dtype, options, steps, **run
    )
    assert_same_params_and_state(kernel, backend, dtype)
    assert_same_params_and_state(kernel, reference, dtype)


@pytest.mark.parametrize("rectify", [False, True])
def test_kernel_schedule_matches_the_schedule_module(rectify):
    hyper = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.999, "warmup_steps": 7}
    averaging = {"r": 0.5, "weight_lr_power": 2.0}
    rows, lr_max, weight_sum = [], 0.0, 0.0
    for step in [*range(1, 31), 100, 2001]:
        rows.append((step, lr_max, weight_sum))
        expected = reference_schedule(
            step, **hyper, eps=1e-8, rectify=rectify, **averaging, lr_max=lr_max,
            weight_sum=weight_sum,
        )  # fmt: skip
        lr_max, weight_sum = expected.lr_max, expected.weight_sum
    computed = schedule_free_step.kernel_schedule(
        rows, **hyper, rectify=rectify, **averaging, device=DEVICE
    ).cpu()
    # fp64, but RAdam's rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t) cancels ~1993 down to
    # ~6 at step 6 of beta2 = 0.999: the kernel's beta2^t by repeated squaring, 1 ulp from
    # Python's pow, moves r_t by 1e-11 relative (the AdamW kernel's schedule alike).
    rtol = 1e-10 if rectify else TOLERANCES[torch.float64][0]
    for (step, lr_max, weight_sum), row in zip(rows, computed.tolist(), strict=True):
        expected = reference_schedule(
            step, **hyper, eps=1e-8, rectify=rectify, **averaging, lr_max=lr_max,
            weight_sum=weight_sum,
        )  # fmt: skip
        wanted = (
            expected.lr,
            expected.lr_max,
            expected.weight_sum,
            expected.average,
            expected.y_coefficient,
            expected.bias_correction2,
        )
        assert row == pytest.approx(wanted, rel=rtol, abs=1e-300), step


def test_one_launch_per_step_per_dtype_group_and_tables_built_once(monkeypatch):
    launches = count_calls(monkeypatch, schedule_free_step, "launch_schedule_free_step")
    import adawarm.triton_backend

    builds = count_calls(monkeypatch, adawarm.triton_backend, "_build_tables")
    params = [torch.zeros(n, device=DEVICE, requires_grad=True) for n in (3, 40, 5)]
    params.append(torch.zeros(9, device=DEVICE, dtype=torch.bfloat16, requires_grad=True))
    optimizer = AdaWarmScheduleFree(params, backend="triton")
    optimizer.train()
    for _ in range(3):
        for param in params:
            if param.grad is None:
                param.grad = torch.ones_like(param)
        optimizer.step()
    assert len(launches) == 6  # fp32 and bf16, three steps
    assert len(builds) == 2  # the gradients kept their pointers: tables reused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_views_take_the_unaligned_kernel_and_update_like_the_torch_backend(dtype):
    sizes = (BLOCK_SIZE + 1, BLOCK_SIZE + 3)

    def run(backend):
        generator = torch.Generator().manual_seed(9)

        def views(first, second):
            storage = torch.randn(sum(sizes) + 16, generator=generator).to(DEVICE, dtype)
            return [storage[first : first + sizes[0]], storage[second : second + sizes[1]]]

        params = [param.requires_grad_() for param in views(1, sizes[0] + 3)]
        optimizer = AdaWarmScheduleFree(params, backend=backend, lr=1e-2, warmup_steps=3)
        optimizer.train()
        for _ in range(8):
            for param, grad in zip(params, views(3, sizes[0] + 5), strict=True):
                param.grad = grad
            optimizer.step()
        optimizer.eval()
        return params, [as_moments(optimizer.state[p]) for p in params], optimizer

    *kernel, optimizer = run("triton")
    *backend, _ = run("torch")
    assert not next(iter(optimizer._table_caches[0].values())).tensors["aligned"]
    assert_same_params_and_state(kernel, backend, dtype)


def test_capturable_steps_take_the_rate_as_a_tensor():
    params = [torch.ones(5, device=DEVICE, requires_grad=True)]
    lr = torch.tensor(0.01, device=DEVICE)
    optimizer = AdaWarmScheduleFree(params, lr=lr, capturable=True, backend="triton")
    optimizer.train()
    params[0].grad = torch.ones(5, device=DEVICE)
    optimizer.step()
    lr.fill_(0.0)  # the next step reads the new rate on the device
    state = optimizer.state[params[0]]
    z = state["z"].clone()
    optimizer.step()
    assert torch.equal(state["z"], z) and float(state["step"]) == 2.0
    assert all(state[key].device == params[0].device for key in ("step", "weight_sum", "lr_max"))


def stochastic_run(backend, seed):
    """bf16 parameters and bf16 states stored stochastically, through steps and switches."""
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.randn(n, generator=generator).to(torch.bfloat16).to(DEVICE).requires_grad_()
        for n in (1500, 7)
    ]
    optimizer = AdaWarmScheduleFree(
        params,
        lr=1e-3,
        warmup_steps=2,
        compensation="stochastic",
        state_dtype=torch.bfloat16,
        rounding_seed=seed,
        backend=backend,
    )
    optimizer.train()
    for step in range(8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype).to(DEVICE)
        optimizer.step()
        if step in (2, 5):
            optimizer.eval()
            optimizer.train()
    optimizer.eval()
    stored = [p.detach() for p in params]
    stored += [optimizer.state[p][key] for p in params for key in ("z", "exp_avg_sq")]
    return torch.cat([t.float().flatten().cpu() for t in stored])


def test_stochastic_stores_and_switches_draw_the_same_streams_in_both_backends():
    kernel, backend = stochastic_run("triton", seed=3), stochastic_run("torch", seed=3)
    # The same random bits for every parameter, z and v: a store can differ only where the two
    # backends' fp32 values differ in the last bit and that crosses a boundary.
    assert (kernel != backend).float().mean() < 1e-3
    assert_close(kernel, backend, torch.bfloat16, "params and states")
    other_seed = stochastic_run("torch", seed=4)
    assert (kernel != other_seed).float().mean() > 0.1  # other streams: other roundings
