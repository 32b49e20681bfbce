"""Functional form of the AdaWarm step and the choice of backend."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from adawarm.schedule import resolve_warmup_steps
from adawarm.torch_backend import torch_step


def select_backend(requested: str | None, params: Sequence[Tensor]) -> str:
    """The backend that serves these tensors: ``requested`` if it can, else a clear error.

    ``None`` picks the fastest backend that can serve the tensors and never fails where
    ``"torch"`` would work.
    """
    if requested is None or requested == "torch":
        return "torch"
    raise ValueError(f"Invalid backend: {requested!r}, expected None or 'torch'")


def adawarm(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int | str,
    rectify: bool,
    maximize: bool = False,
    backend: str | None = None,
    torch_implementation: str | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One AdaWarm step over lists of tensors; see :class:`adawarm.AdaWarm` for the algorithm.

    ``state_steps`` are float32 scalar tensors, incremented here. ``torch_implementation``
    (``"reference"``, ``"foreach"``, ``"fused"`` or ``None`` for the fastest) picks the torch
    backend's implementation; it exists to test them against each other.
    """
    chosen = select_backend(backend, params)
    if chosen == "torch":
        torch_step(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=resolve_warmup_steps(warmup_steps, beta2),
            rectify=rectify,
            maximize=maximize,
            implementation=torch_implementation,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
