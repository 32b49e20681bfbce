"""Putting a failed step back: copies of what a step changes, and the error it then raises."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from adawarm.functional import local_tensors

# torch >= 2.5 names it at the top level; both names are one class.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

_ADVICE = {
    "triton": (
        "If the Triton kernel cannot run here, pass backend='torch' (or fused=False) to use the "
        "PyTorch backend."
    ),
    "torch": "The PyTorch backend raised it; the message above says which tensor op failed.",
}


class _StepPart(Protocol):
    params: list[Tensor]
    shards: list[Tensor]
    states: dict[str, list[Tensor | None]]


class StepSnapshot:
    """Copies of every tensor a step may change: parameters and every state entry (moments,
    Kahan buffers, step counters, ...). The states of ``created`` parameters (made by this
    step) are not copied: the caller removes them instead."""

    def __init__(self, parts: Iterable[_StepPart], created: Sequence[Tensor]) -> None:
        new = set(map(id, created))
        originals: list[Tensor] = []
        for part in parts:
            originals += part.shards
            kept = [i for i, param in enumerate(part.params) if id(param) not in new]
            for tensors in part.states.values():
                originals += [t for t in local_tensors([tensors[i] for i in kept]) if t is not None]
        self._saved = [(tensor, tensor.clone()) for tensor in originals]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, copy in self._saved:
                tensor.copy_(copy)


def failed_step_error(
    error: BaseException, backends: Iterable[str], optimizer: str = "AdaWarm"
) -> BaseException | None:
    """The error to raise, chained to ``error``, after a failed step of ``optimizer`` (its
    class name) was put back; None to raise ``error`` itself (an interrupt, or running out of
    memory, which callers catch by type)."""
    restored = (
        "Parameters and their states (moments, Kahan buffers, step counters) are as they were "
        "before the step."
    )
    if not isinstance(error, Exception) or isinstance(error, _OUT_OF_MEMORY):
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"{optimizer}.step() failed. {restored}")
        return None
    names = sorted(set(backends))
    advice = " ".join(_ADVICE[name] for name in names)
    return RuntimeError(
        f"{optimizer}.step() failed in the {' and '.join(names)} backend "
        f"({type(error).__name__}: {error}). {restored} {advice}"
    )
