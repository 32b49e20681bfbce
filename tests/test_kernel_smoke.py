"""First light: a handful of cases that cover what a GPU run of the kernels must get right first.

Stage 1 of ``python -m bench gpu`` runs this file on the GPU (the compiled kernels); CI runs it
under Triton's interpreter. Each case steps the Triton backend and the torch backend on the same
device through 12 steps -- past RAdam's threshold (t = 6), one of them skipped as a GradScaler
skips an inf step -- and compares parameters and every state entry at the dtype table's
tolerances: AdaWarm's step, and AdaWarmScheduleFree's step and train/eval switch.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    as_moments,
    assert_same_params_and_state,
    optimizer_trajectory,
    schedule_free_trajectory,
)

from adawarm import AdaWarm, AdaWarmScheduleFree
from adawarm.kernels.common import BLOCK_SIZE
from bench.graphs import WARMUP_CALLS, replayable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 12
ODD_SHAPES = [(0,), (1,), (7,), (BLOCK_SIZE - 1,), (BLOCK_SIZE + 1,), (3, 5)]
BASE = {
    "lr": 1e-2,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.1,
    "warmup_steps": 4,
    "rectify": True,
    "maximize": False,
    "state_dtype": None,
    "compensation": None,
    "rounding_seed": 7,
}
CASES = {
    "fp32": (torch.float32, {}),
    "fp32 no rectification, maximize": (torch.float32, {"rectify": False, "maximize": True}),
    "fp32, bf16 moments": (torch.float32, {"state_dtype": torch.bfloat16}),
    "bf16": (torch.bfloat16, {}),
    "bf16 Kahan, bf16 moments": (
        torch.bfloat16,
        {"compensation": "kahan", "state_dtype": torch.bfloat16},
    ),
    "bf16 stochastic, bf16 moments": (
        torch.bfloat16,
        {"compensation": "stochastic", "state_dtype": torch.bfloat16},
    ),
    "fp16 Kahan": (torch.float16, {"compensation": "kahan"}),
    # every tensor coded (min_8bit_size 0): blocks of 256 straddled by the odd sizes
    "fp32, 8-bit moments": (torch.float32, {"state_dtype": torch.uint8, "min_8bit_size": 0}),
    "bf16 stochastic, 8-bit moments": (
        torch.bfloat16,
        {"compensation": "stochastic", "state_dtype": torch.uint8, "min_8bit_size": 0},
    ),
}


def assert_kernel_equals_torch_backend(run, dtype):
    """``run(backend)`` is a trajectory of STEPS steps with one skipped: the kernel's and the
    torch backend's agree, parameters and every state entry."""
    kernel = run("triton")
    assert all(float(state["step"]) == STEPS - 1 for state in kernel[1])
    assert_same_params_and_state(kernel, run("torch"), dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_torch_backend(case):
    dtype, options = CASES[case]
    options = {**BASE, **options}
    # Step 3 carries an inf gradient and found_inf; the optimizer is rebuilt from its
    # state_dict after step 7.
    assert_kernel_equals_torch_backend(
        lambda backend: optimizer_trajectory(
            backend, ODD_SHAPES, dtype, options, STEPS, {3}, 7, DEVICE
        ),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_views_match_the_torch_backend(dtype):
    sizes = (BLOCK_SIZE + 1, 2 * BLOCK_SIZE + 3)

    def trajectory(backend):
        generator = torch.Generator().manual_seed(9)

        def views(first: int, second: int) -> list[torch.Tensor]:
            # Contiguous views at odd element offsets of one storage: misaligned pointers.
            storage = torch.randn(sum(sizes) + 16, generator=generator).to(DEVICE, dtype)
            return [storage[first : first + sizes[0]], storage[second : second + sizes[1]]]

        params = [param.requires_grad_() for param in views(1, sizes[0] + 3)]
        optimizer = AdaWarm(params, backend=backend, **BASE)
        for _ in range(STEPS):
            for param, grad in zip(params, views(3, sizes[0] + 5), strict=True):
                param.grad = grad
            optimizer.step()
        return params, [optimizer.state[param] for param in params], optimizer

    *kernel, optimizer = trajectory("triton")
    *backend, _ = trajectory("torch")
    tables = next(iter(optimizer._table_caches[0].values())).tensors
    assert not tables["aligned"]
    assert_same_params_and_state(kernel, backend, dtype)


@pytest.mark.parametrize("warmup", [4, "measured"], ids=["ramp", "measured"])
@pytest.mark.parametrize(
    "state_dtype",
    [None, torch.bfloat16, torch.uint8],
    ids=["fp32 moments", "bf16 moments", "8-bit moments"],
)
def test_captured_capturable_step_replays_like_eager_steps(state_dtype, warmup):
    # On a GPU the step is replayed from a CUDA graph; on a CPU (CI, the rehearsal) the same
    # capturable step runs eagerly.
    shapes = [(1,), (BLOCK_SIZE + 1,), (33, 17)]
    generator = torch.Generator().manual_seed(3)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    captured_params = [p.clone().to(DEVICE).requires_grad_() for p in start]
    eager_params = [p.clone().to(DEVICE).requires_grad_() for p in start]
    lr = torch.tensor(1e-2, device=DEVICE)
    options = {**BASE, "state_dtype": state_dtype, "warmup_steps": warmup, "min_8bit_size": 0}
    del options["lr"]
    captured = AdaWarm(captured_params, lr=lr, backend="triton", capturable=True, **options)
    eager = AdaWarm(eager_params, lr=1e-2, backend="torch", **options)
    for param in captured_params:  # static gradients: the graph reads their addresses
        param.grad = torch.zeros_like(param)

    def set_gradients() -> None:
        for mine, theirs in zip(captured_params, eager_params, strict=True):
            mine.grad.copy_(torch.randn(mine.shape, generator=generator).to(DEVICE))
            theirs.grad = mine.grad.clone()

    set_gradients()
    replay = replayable(captured.step, DEVICE)  # WARMUP_CALLS steps with these gradients
    for _ in range(WARMUP_CALLS):
        eager.step()
    for step in range(WARMUP_CALLS, STEPS):
        set_gradients()
        if step == 8:
            lr.fill_(5e-3)  # a tensor lr changes without recapture
            eager.param_groups[0]["lr"] = 5e-3
        replay()
        eager.step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert all(float(captured.state[p]["step"]) == STEPS for p in captured_params)
    assert_same_params_and_state(
        (captured_params, [captured.state[p] for p in captured_params]),
        (eager_params, [eager.state[p] for p in eager_params]),
        torch.float32,
    )


SCHEDULE_FREE_CASES = {
    "schedule-free fp32": (torch.float32, {}),
    "schedule-free bf16 stochastic, bf16 state": (
        torch.bfloat16,
        {"compensation": "stochastic", "state_dtype": torch.bfloat16},
    ),
    "schedule-free fp16 Kahan, rectified": (torch.float16, {"compensation": "kahan"}),
    "schedule-free bf16 stochastic, 8-bit state": (
        torch.bfloat16,
        {"compensation": "stochastic", "state_dtype": torch.uint8, "min_8bit_size": 0},
    ),
}


@pytest.mark.parametrize("case", list(SCHEDULE_FREE_CASES))
def test_schedule_free_kernel_matches_the_torch_backend(case):
    dtype, options = SCHEDULE_FREE_CASES[case]
    options = {
        **{k: v for k, v in BASE.items() if k not in ("rectify", "maximize")},
        "rectify": "rectified" in case,
        "r": 0.5,
        **options,
    }
    # step 3 skipped, a reload after step 7, an evaluation (eval, then train) after step 5
    assert_kernel_equals_torch_backend(
        lambda backend: schedule_free_trajectory(
            {"backend": backend}, ODD_SHAPES, dtype, options, STEPS, {3}, 7, 5, DEVICE
        ),
        dtype,
    )


@pytest.mark.parametrize("warmup", [4, "measured"], ids=["ramp", "measured"])
def test_captured_schedule_free_step_replays_like_eager_steps(warmup):
    shapes = [(1,), (BLOCK_SIZE + 1,), (33, 17)]
    generator = torch.Generator().manual_seed(4)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    captured_params = [p.clone().to(DEVICE).requires_grad_() for p in start]
    eager_params = [p.clone().to(DEVICE).requires_grad_() for p in start]
    options = {"warmup_steps": warmup, "weight_decay": 0.1}
    lr = torch.tensor(1e-2, device=DEVICE)
    captured = AdaWarmScheduleFree(
        captured_params, lr=lr, backend="triton", capturable=True, **options
    )
    eager = AdaWarmScheduleFree(eager_params, lr=1e-2, backend="torch", **options)
    captured.train()
    eager.train()
    for param in captured_params:
        param.grad = torch.zeros_like(param)

    def set_gradients() -> None:
        for mine, theirs in zip(captured_params, eager_params, strict=True):
            mine.grad.copy_(torch.randn(mine.shape, generator=generator).to(DEVICE))
            theirs.grad = mine.grad.clone()

    set_gradients()
    replay = replayable(captured.step, DEVICE)
    for _ in range(WARMUP_CALLS):
        eager.step()
    for step in range(WARMUP_CALLS, STEPS):
        set_gradients()
        if step == 8:
            lr.fill_(5e-3)
            eager.param_groups[0]["lr"] = 5e-3
        replay()
        eager.step()
    captured.eval()
    eager.eval()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert_same_params_and_state(
        (captured_params, [as_moments(captured.state[p]) for p in captured_params]),
        (eager_params, [as_moments(eager.state[p]) for p in eager_params]),
        torch.float32,
    )
