"""The Triton kernel, run by Triton's interpreter on CPU tensors (or on a GPU when present)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TOLERANCES, assert_bit_identical, count_calls
from hypothesis import assume, given
from hypothesis import strategies as st
from kernel_cases import (
    assert_same_params_and_state,
    kernel_dtypes,
    kernel_options,
    optimizer_trajectory,
    reference_trajectory,
    shape_lists,
)

import adawarm.triton_backend
from adawarm import AdaWarm, step_schedule
from adawarm.kernels import adawarm_step, common
from adawarm.kernels.adawarm_step import kernel_schedule
from adawarm.kernels.common import BLOCK_SIZE
from adawarm.schedule import resolve_warmup_steps

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@given(
    options=kernel_options,
    shapes=shape_lists,
    dtype=kernel_dtypes,
    steps=st.integers(1, 12),
    inf_steps=st.sets(st.integers(0, 11), max_size=3),
    reload_at=st.integers(0, 11),
)
def test_kernel_equals_torch_backend_and_reference(
    options, shapes, dtype, steps, inf_steps, reload_at
):
    # Stochastic rounding is for bf16 parameters; fp16 ones refuse it (tested elsewhere).
    assume(not (dtype == torch.float16 and options["compensation"] == "stochastic"))
    kernel = optimizer_trajectory(
        "triton", shapes, dtype, options, steps, inf_steps, reload_at, DEVICE
    )
    backend = optimizer_trajectory(
        "torch", shapes, dtype, options, steps, inf_steps, reload_at, DEVICE
    )
    reference = reference_trajectory(shapes, dtype, options, steps, inf_steps)
    assert_same_params_and_state(kernel, backend, dtype)
    assert_same_params_and_state(kernel, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rectify", [False, True])
def test_kernel_on_block_edges_past_the_threshold(dtype, rectify):
    shapes = [(0,), (1,), (BLOCK_SIZE - 1,), (BLOCK_SIZE,), (BLOCK_SIZE + 1,), (3, 5)]
    options = {"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 4, "rectify": rectify}
    kernel = optimizer_trajectory("triton", shapes, dtype, options, 12, {3}, 7, DEVICE)
    reference = reference_trajectory(
        shapes, dtype, {**options, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": False}, 12, {3}
    )
    assert_same_params_and_state(kernel, reference, dtype)


@pytest.mark.parametrize(("block_size", "num_warps"), [(128, 2), (4096, 8)])
def test_other_block_sizes_and_warps_update_like_the_default(block_size, num_warps):
    # What `python -m bench tune` varies: the program layout must not change a single bit.
    sizes = [0, 1, block_size - 1, block_size + 1, 2 * BLOCK_SIZE + 3]

    def run(block, warps):
        generator = torch.Generator().manual_seed(5)
        params = [torch.randn(n, generator=generator).to(DEVICE) for n in sizes]
        lists = {
            "param": params,
            "grad": [torch.empty_like(p) for p in params],
            "exp_avg": [torch.zeros_like(p) for p in params],
            "exp_avg_sq": [torch.zeros_like(p) for p in params],
            "step": [torch.zeros((), device=DEVICE) for _ in params],
        }
        tables = common.launch_tables(lists, DEVICE, block_size=block)
        for _ in range(8):  # past the rectification threshold
            for grad in lists["grad"]:
                grad.copy_(torch.randn(grad.shape, generator=generator))
            adawarm_step.launch_adawarm_step(
                tables,
                param_dtype=torch.float32,
                state_dtype=torch.float32,
                lr=1e-2,
                beta1=0.9,
                beta2=0.99,
                eps=1e-8,
                weight_decay=0.1,
                warmup_steps=3,
                rectify=True,
                maximize=False,
                num_warps=warps,
            )
        return [t for name, tensors in lists.items() if name != "grad" for t in tensors]

    tuned, default = run(block_size, num_warps), run(BLOCK_SIZE, common.NUM_WARPS)
    assert float(tuned[-1]) == 8.0
    assert_bit_identical(tuned, default)


def test_bf16_stores_round_to_nearest_even_like_torch():
    # The interpreter truncates fp32 -> bf16; the kernel rounds explicitly, so after many steps
    # it still agrees with the torch backend to the bit in nearly every element and to 1 ulp.
    shapes = [(BLOCK_SIZE + 1,)]
    options = {"lr": 1e-3, "warmup_steps": 0, "rectify": False}
    kernel = optimizer_trajectory("triton", shapes, torch.bfloat16, options, 12, set(), -1, DEVICE)
    backend = optimizer_trajectory("torch", shapes, torch.bfloat16, options, 12, set(), -1, DEVICE)
    mine, theirs = kernel[0][0].detach().cpu(), backend[0][0].detach()
    ulps = (mine.view(torch.int16).int() - theirs.view(torch.int16).int()).abs()
    assert ulps.max() <= 1
    assert (ulps == 0).float().mean() >= 0.99


@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("warmup_steps", [0, 7, "untuned", "auto"])
def test_kernel_schedule_matches_the_schedule_module(rectify, warmup_steps):
    steps = [*range(1, 31), 100, 1999, 2000, 2001, 123_456]
    hyper = {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    resolved = resolve_warmup_steps(warmup_steps, hyper["beta2"])
    rows = kernel_schedule(
        steps, **hyper, warmup_steps=resolved, rectify=rectify, device=DEVICE
    ).cpu()
    for step, row in zip(steps, rows.tolist(), strict=True):
        expected = step_schedule(step, **hyper, warmup_steps=resolved, rectify=rectify)
        decay, step_size, bias_correction2_sqrt, eps, adaptive = row
        assert adaptive == float(expected.adaptive), step
        rtol = TOLERANCES[torch.float64][0]
        assert decay == pytest.approx(expected.decay, rel=rtol)
        assert step_size == pytest.approx(expected.step_size, rel=rtol)
        assert bias_correction2_sqrt == pytest.approx(expected.bias_correction2_sqrt, rel=rtol)
        assert eps == pytest.approx(expected.eps, rel=rtol)


def set_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)


def test_one_launch_per_step_per_dtype_group_whatever_the_tensor_count(monkeypatch):
    launches = count_calls(monkeypatch, adawarm_step, "launch_adawarm_step")
    params = [torch.randn(n % 5, device=DEVICE, requires_grad=True) for n in range(40)]
    params += [torch.randn(3, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)]
    opt = AdaWarm(params, backend="triton")
    for expected in (2, 4, 6):
        set_grads(params)
        opt.step()
        assert len(launches) == expected


def test_pointer_tables_are_rebuilt_only_when_a_pointer_changes(monkeypatch):
    builds = count_calls(monkeypatch, adawarm.triton_backend, "_build_tables")
    params = [torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(3)]
    opt = AdaWarm(params, backend="triton")
    set_grads(params)
    opt.step()
    opt.step()
    assert len(builds) == 1, "same gradients: tables reused"
    old_grads = [p.grad for p in params]  # keep them alive so new gradients get new memory
    set_grads(params)
    opt.step()
    assert len(builds) == 2, "new gradient tensors: tables rebuilt"
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step()
    assert len(builds) == 3, "load_state_dict replaced the state tensors"
    extra = torch.randn(4, device=DEVICE, requires_grad=True)
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.randn(4, device=DEVICE)
    opt.step()
    assert len(builds) == 4, "a new group gets its own tables; group 0 keeps its tables"
    del old_grads


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    params = [torch.randn(3, requires_grad=True)]
    params[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"on the CPU: CPU tensors need Triton's interpreter"):
        AdaWarm(params, backend="triton").step()
    AdaWarm(params).step()  # backend=None falls back to torch


def test_unsupported_dtype_is_refused_for_triton_and_served_by_auto():
    params = [torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)]
    params[0].grad = torch.ones(3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"dtype torch\.float64"):
        AdaWarm(params, backend="triton").step()
    AdaWarm(params).step()


def test_non_contiguous_parameter_is_refused_for_triton():
    param = torch.randn(4, 3, device=DEVICE).t().requires_grad_()
    param.grad = torch.ones(3, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"shape \(3, 4\) is not contiguous"):
        AdaWarm([param], backend="triton").step()


def test_non_contiguous_gradient_is_copied_and_correct():
    grad = torch.randn(4, 3, device=DEVICE).t()
    results = []
    for backend in ("triton", "torch"):
        param = torch.ones(3, 4, device=DEVICE, requires_grad=True)
        param.grad = grad
        AdaWarm([param], backend=backend, warmup_steps=0, rectify=False).step()
        results.append(param.detach().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_tensors_on_two_devices_in_one_launch_are_refused():
    param = torch.randn(3, device=DEVICE)
    lists = {
        "param": [param],
        "grad": [torch.randn(3, device="meta")],
        "exp_avg": [torch.zeros(3, device=DEVICE)],
        "exp_avg_sq": [torch.zeros(3, device=DEVICE)],
        "step": [torch.zeros((), device=DEVICE)],
    }
    with pytest.raises(RuntimeError, match="Tensors on two devices in one Triton launch"):
        adawarm.triton_backend._build_tables(lists, ((0,),) * 5, param.device)


def test_sparse_gradient_is_refused_with_triton():
    param = torch.randn(3, device=DEVICE, requires_grad=True)
    param.grad = torch.ones(3, device=DEVICE).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        AdaWarm([param], backend="triton").step()


def test_capturable_needs_the_triton_backend():
    param = torch.randn(3, device=DEVICE, requires_grad=True)
    param.grad = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="capturable=True with backend='torch'"):
        AdaWarm([param], capturable=True, backend="torch")
    wide = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    wide.grad = torch.ones_like(wide)
    with pytest.raises(RuntimeError, match="capturable=True needs the Triton backend"):
        AdaWarm([wide], capturable=True).step()  # backend=None resolves to torch for fp64
    opt = AdaWarm([param], capturable=True, backend="triton", lr=torch.tensor(1e-2, device=DEVICE))
    opt.step()
    assert opt.state[param]["step"].device == param.device
    assert float(opt.state[param]["step"]) == 1.0


def launch_lists(param_dtype, state_dtype, misaligned: str | None, offset_elements: int = 1):
    """Tables' lists of one tensor of 2051 elements, the named list a view at an offset."""

    def tensor(dtype, name):
        base = torch.zeros(2051 + offset_elements, dtype=dtype, device=DEVICE)
        return base[offset_elements:] if name == misaligned else base[:2051]

    lists = {
        "param": [tensor(param_dtype, "param")],
        "grad": [tensor(param_dtype, "grad")],
        "exp_avg": [tensor(state_dtype, "exp_avg")],
        "exp_avg_sq": [tensor(state_dtype, "exp_avg_sq")],
        "step": [torch.zeros((), device=DEVICE)],
    }
    if param_dtype != torch.float32:
        lists["compensation"] = [tensor(param_dtype, "compensation")]
    return lists


@pytest.mark.parametrize("misaligned", ["param", "grad", "exp_avg", "exp_avg_sq", "compensation"])
def test_one_misaligned_pointer_sends_the_launch_to_the_unaligned_variant(misaligned):
    assert common.launch_tables(launch_lists(torch.bfloat16, torch.float32, None), DEVICE)[
        "aligned"
    ]
    lists = launch_lists(torch.bfloat16, torch.float32, misaligned)
    assert not common.launch_tables(lists, DEVICE)["aligned"]


def test_mixed_width_launches_need_8_bytes_of_the_narrow_dtype():
    # bf16 parameters beside fp32 moments move 4 elements (8 bytes) per access.
    assert common.vector_alignments(torch.bfloat16, torch.float32) == (8, 16)
    assert common.vector_alignments(torch.bfloat16, torch.bfloat16) == (16, 16)
    four_elements_in = launch_lists(torch.bfloat16, torch.float32, "param", offset_elements=4)
    assert common.launch_tables(four_elements_in, DEVICE)["aligned"]
    fp32_moments_8_bytes_in = launch_lists(torch.bfloat16, torch.float32, "exp_avg", 2)
    assert not common.launch_tables(fp32_moments_8_bytes_in, DEVICE)["aligned"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views_update_like_the_torch_backend(dtype):
    def run(backend):
        generator = torch.Generator().manual_seed(9)
        sizes = (BLOCK_SIZE + 1, BLOCK_SIZE + 3)

        def views(first: int, second: int) -> list[torch.Tensor]:
            # Contiguous views at odd element offsets of one storage: misaligned pointers.
            storage = torch.randn(sum(sizes) + 16, generator=generator).to(DEVICE, dtype)
            return [storage[first : first + sizes[0]], storage[second : second + sizes[1]]]

        params = [param.requires_grad_() for param in views(1, sizes[0] + 3)]
        opt = AdaWarm(params, backend=backend, lr=1e-2, warmup_steps=3, rectify=True)
        for _ in range(8):
            for param, grad in zip(params, views(3, sizes[0] + 5), strict=True):
                param.grad = grad
            opt.step()
        return params, opt

    (mine, opt), (theirs, _) = run("triton"), run("torch")
    tables = next(iter(opt._table_caches[0].values())).tensors
    assert not tables["aligned"]
    for p, q in zip(mine, theirs, strict=True):
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=rtol, atol=atol)
