"""Functional form of the AdaWarm step and the choice of backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adawarm.schedule import resolve_warmup_steps
from adawarm.torch_backend import torch_step
from adawarm.triton_backend import triton_step, unservable_reason
from adawarm.triton_op import triton_step_op

if not torch.distributed.is_available():  # builds without distributed support have no DTensor
    _DTensor = None
else:
    try:
        from torch.distributed.tensor import DTensor as _DTensor
    except ImportError:  # torch < 2.5 kept it private
        from torch.distributed._tensor import DTensor as _DTensor


def local_tensors(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The local shards of DTensors (FSDP2, tensor parallel), other entries (tensors, None) as
    they are.

    The update is element-wise, so each rank updates its own shard; the DTensors share storage
    with their local tensors, so the update lands in them.
    """
    # One type() pass first (~20 us at 500 tensors on the CI machine): this runs every step for
    # every tensor, and plain tensors are the common case.
    if _DTensor is None or not any(issubclass(kind, _DTensor) for kind in set(map(type, tensors))):
        return list(tensors)
    return [t.to_local() if isinstance(t, _DTensor) else t for t in tensors]


def select_backend(requested: str | None, params: Sequence[Tensor]) -> str:
    """The backend that serves these tensors: ``requested`` if it can, else a clear error.

    ``None`` picks the Triton kernel for CUDA tensors it can serve and the torch backend
    otherwise, so it never fails where ``"torch"`` would work.
    """
    if requested == "torch":
        return "torch"
    if requested is None:
        if params and all(p.is_cuda for p in params) and unservable_reason(params) is None:
            return "triton"
        return "torch"
    if requested == "triton":
        reason = unservable_reason(params)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot serve these tensors: {reason}")
        return "triton"
    raise ValueError(f"Invalid backend: {requested!r}, expected None, 'torch' or 'triton'")


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
    table_cache: dict | None = None,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
) -> None:
    """One AdaWarm step over lists of tensors; see :class:`adawarm.AdaWarm` for the algorithm.

    ``state_steps`` are float32 scalar tensors, incremented here. ``torch_implementation``
    (``"reference"``, ``"foreach"``, ``"fused"`` or ``None`` for the fastest) picks the torch
    backend's implementation; it exists to test them against each other.
    """
    params, grads, exp_avgs, exp_avg_sqs = (
        local_tensors(tensors) for tensors in (params, grads, exp_avgs, exp_avg_sqs)
    )
    if compensations is not None:
        compensations = local_tensors(compensations)
    run_backend(
        select_backend(backend, params),
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
        warmup_steps=warmup_steps,
        rectify=rectify,
        maximize=maximize,
        torch_implementation=torch_implementation,
        grad_scale=grad_scale,
        found_inf=found_inf,
        table_cache=table_cache,
        compensations=compensations,
        rounding_seed=rounding_seed,
    )


def run_backend(
    backend: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    warmup_steps: int | str,
    beta2: float,
    torch_implementation: str | None,
    table_cache: dict | None,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
    **options,
) -> None:
    """Run the step on a backend :func:`select_backend` has already approved for these tensors."""
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    options.update(beta2=beta2, warmup_steps=resolve_warmup_steps(warmup_steps, beta2))
    if backend == "triton":
        # Under torch.compile the step is one custom op; eagerly the op's dispatch would only
        # add host time.
        step = triton_step_op if torch.compiler.is_compiling() else triton_step
        step(
            *tensors,
            **options,
            table_cache=table_cache,
            compensations=compensations,
            rounding_seed=rounding_seed,
        )
    else:
        torch_step(
            *tensors,
            **options,
            implementation=torch_implementation,
            compensations=compensations,
            rounding_seed=rounding_seed,
        )
