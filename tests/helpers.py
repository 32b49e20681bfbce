"""Shared test helpers: the tolerance table, parameter factories and trajectory comparison."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# The one table of tolerances (rtol, atol) for comparing parameters and state, per dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}
# 8-bit moments (uint8 codes): the share of codes that may differ, by one level, between two
# computations of the same step -- a GPU kernel's fp32 division is approximate, and can move a
# value across a rounding boundary of the code table (under the interpreter none differ).
CODE_FLIPS = 0.01

ODD_SHAPES: tuple[tuple[int, ...], ...] = (
    (0,),
    (1,),
    (7,),
    (1023,),
    (1025,),
    (3, 5),
    (2, 3, 4),
    (2, 1, 3, 5),
)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def make_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
        for shape in shapes
    ]


def non_contiguous_randn(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator
) -> Tensor:
    """A random tensor of ``shape`` laid out non-contiguously (when it has >1 element)."""
    if len(shape) >= 2:
        data = torch.randn(shape[::-1], generator=generator, dtype=torch.float64).to(dtype)
        return data.permute(*reversed(range(len(shape))))
    data = torch.randn((2 * shape[0],), generator=generator, dtype=torch.float64).to(dtype)
    return data[::2]


def gradient_stream(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, steps: int, seed: int
) -> list[list[Tensor]]:
    """``steps`` lists of non-contiguous gradients, the same for every call with the same seed."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [[non_contiguous_randn(s, dtype, generator) for s in shapes] for _ in range(steps)]


def train(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    grads: Sequence[Sequence[Tensor]],
    after_step: Callable[[int], None] | None = None,
) -> None:
    for index, step_grads in enumerate(grads):
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone(memory_format=torch.preserve_format)
        optimizer.step()
        if after_step is not None:
            after_step(index)


def assert_same_trajectory_state(
    actual: torch.optim.Optimizer,
    actual_params: Sequence[Tensor],
    expected: torch.optim.Optimizer,
    expected_params: Sequence[Tensor],
    dtype: torch.dtype,
) -> None:
    """Parameters and every state entry (step, exp_avg, exp_avg_sq) agree within tolerance."""
    for index, (mine, theirs) in enumerate(zip(actual_params, expected_params, strict=True)):
        assert_close(mine.detach(), theirs.detach(), dtype, f"param {index}")
        state, other = actual.state[mine], expected.state[theirs]
        assert set(state) == set(other), f"state keys {set(state)} != {set(other)}"
        assert float(state["step"]) == float(other["step"]), f"step of param {index}"
        assert state["step"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(
                state[key].to(other[key].dtype), other[key], dtype, f"{key} of param {index}"
            )


def assert_bit_identical(first: Sequence[Tensor], second: Sequence[Tensor]) -> None:
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "tensors differ"


def count_calls(monkeypatch, owner: object, name: str) -> list[str]:
    """Replace ``owner.name`` for the test with a wrapper that records each call (the list grows
    with every call)."""
    calls: list[str] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def tiny_language_model(transformers, rows: int, **config):
    """A GPT-2 of one small layer from a config, and ``rows`` sequences of 16 tokens as its
    dataset (labels are the inputs) -- the Hugging Face Trainer's tests' model."""
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, **config
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (rows, 16), generator=torch.Generator().manual_seed(0))
    return model, [{"input_ids": row, "labels": row} for row in tokens]


def cpu_training_arguments(transformers, folder, **arguments):
    """TrainingArguments for a short run on the CPU that reports to nothing and saves nothing."""
    return transformers.TrainingArguments(
        output_dir=str(folder), report_to=[], save_strategy="no", use_cpu=True, **arguments
    )
