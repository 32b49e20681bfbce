"""Functional form of the AdaWarm step and the choice of backend."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from adawarm.schedule import MEASURED, resolve_warmup_steps
from adawarm.torch_backend import fused_available, torch_step
from adawarm.triton_backend import triton_step, unservable_reason
from adawarm.triton_op import triton_step_op
from adawarm.validation import check_execution

# The modules that define DTensor (torch >= 2.5, and 2.4's private one). A tensor can only be a
# DTensor once its module is imported, so the check below never imports it: that import costs
# ~0.5 s, a third of `import torch`.
_DTENSOR_MODULES = ("torch.distributed.tensor._api", "torch.distributed._tensor.api")


def _dtensor_class() -> type | None:
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            return module.DTensor
    return None


def has_dtensors(tensors: Sequence[Tensor | None]) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2, tensor parallel)."""
    # One type() pass (~20 us at 500 tensors on the CI machine): this runs every step for every
    # parameter, and plain tensors are the common case.
    dtensor = _dtensor_class()
    return dtensor is not None and any(
        issubclass(kind, dtensor) for kind in set(map(type, tensors))
    )


def local_tensors(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The local shards of DTensors (FSDP2, tensor parallel), other entries (tensors, None) as
    they are.

    The update is element-wise, so each rank updates its own shard; the DTensors share storage
    with their local tensors, so the update lands in them.
    """
    if not has_dtensors(tensors):
        return list(tensors)
    dtensor = _dtensor_class()
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def select_backend(requested: str | None, params: Sequence[Tensor]) -> str:
    """The backend that serves these tensors: ``requested`` if it can, else a clear error.

    ``None`` picks the Triton kernel for CUDA tensors it can serve and the torch backend
    otherwise, so it never fails where ``"torch"`` would work.
    """
    if requested == "torch":
        return "torch"
    if requested is None:
        # a generator, not map(IS_CUDA, ...): torch.compile traces this, and dynamo cannot call
        # an attrgetter
        if params and all(p.is_cuda for p in params) and unservable_reason(params) is None:
            return "triton"
        return "torch"
    reason = unservable_reason(params)  # "triton": check_execution admits no other name
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot serve these tensors: {reason}")
    return "triton"


def select_execution(
    backend: str | None,
    params: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> tuple[str, str | None]:
    """The backend, and the torch backend's implementation (None: its fastest), that run a step
    of these tensors under torch.optim.AdamW's ``foreach``/``fused`` options.

    ``fused=True`` is the fused path: the Triton kernel for CUDA tensors, torch's fused AdamW
    kernel for CPU tensors; ``foreach=True`` the ``torch._foreach_*`` implementation,
    ``foreach=False`` the single-tensor one, ``fused=False`` anything but a fused kernel; both
    ``None``: ``backend`` decides. A request these tensors cannot meet raises, naming why.
    """
    check_execution({"backend": backend, "foreach": foreach, "fused": fused, "capturable": False})
    return checked_execution(backend, params, foreach=foreach, fused=fused)


def checked_execution(
    backend: str | None,
    params: Sequence[Tensor],
    *,
    foreach: bool | None,
    fused: bool | None,
) -> tuple[str, str | None]:
    """:func:`select_execution` for choices already checked with each other (an optimizer's
    group: its checks ran)."""
    if fused:
        return _fused_execution(backend, params)
    if foreach is not None or fused is False:
        return "torch", "reference" if foreach is False else "foreach"
    return select_backend(backend, params), None


def _fused_execution(backend: str | None, params: Sequence[Tensor]) -> tuple[str, str | None]:
    if not params:
        return select_backend(backend, params), None
    if all(p.is_cuda for p in params):
        if backend == "torch":
            raise RuntimeError(
                "fused=True runs CUDA tensors through the Triton kernel, but backend='torch'; "
                "pass backend=None, or fused=None to use the torch backend"
            )
        reason = unservable_reason(params)
        if reason is not None:
            raise RuntimeError(
                f"fused=True runs CUDA tensors through the Triton kernel, which cannot serve "
                f"these: {reason}; pass fused=None to let the torch backend take them"
            )
        return "triton", None
    if backend == "triton":  # CPU tensors under Triton's interpreter
        return select_backend(backend, params), None
    if all(p.is_cpu for p in params):
        if not fused_available(params[0]):
            raise RuntimeError(
                f"fused=True: torch {torch.__version__} has no fused AdamW kernel for CPU "
                "tensors (torch._fused_adamw_); pass fused=None"
            )
        strided = next((p for p in params if not p.is_contiguous()), None)
        if strided is not None:
            raise RuntimeError(
                f"fused=True: a parameter of shape {tuple(strided.shape)} and strides "
                f"{strided.stride()} is not contiguous, and torch's fused CPU kernel walks "
                "contiguous memory (it mis-updates strided tensors); pass fused=None, which "
                "updates such tensors with foreach ops"
            )
        return "torch", "fused"
    device = next(p.device for p in params if not p.is_cpu)
    raise RuntimeError(
        f"fused=True: no fused kernel serves tensors on {device} (the Triton kernel takes CUDA "
        "tensors, torch's fused AdamW kernel CPU ones); pass fused=None or foreach=True"
    )


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
    total_steps: int | None = None,
    backend: str | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    table_cache: dict | None = None,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = 0,
    stochastic_params: bool = False,
    relative_updates: Sequence[Tensor] | None = None,
    exp_avg_scales: Sequence[Tensor | None] | None = None,
    exp_avg_sq_scales: Sequence[Tensor | None] | None = None,
) -> None:
    """One AdaWarm step over lists of tensors; see [`AdaWarm`][adawarm.AdaWarm] for the algorithm.

    ``state_steps`` are float32 scalar tensors, incremented here. ``backend``, ``foreach``
    and ``fused`` choose how the step runs, as in [`AdaWarm`][adawarm.AdaWarm] (see
    ``adawarm.functional.select_execution``). ``compensations`` are Kahan buffers (``None`` for
    tensors without one). bf16 moments are stored by stochastic rounding from
    ``rounding_seed``, and so are bf16 parameters with ``stochastic_params``;
    ``rounding_seed=None`` rounds every store to nearest (which biases bf16 moments: small
    updates are lost). With ``warmup_steps="measured"``, ``relative_updates`` are the tensors'
    ``relative_update`` entries (``adawarm.state.first_relative_update`` before a first step;
    pairs in the update's dtype, on the CPU for the torch backend and on the parameters' device
    for the
    Triton kernel), which the step reads and replaces. 8-bit (uint8) moments come with their
    block scales in ``exp_avg_scales`` and ``exp_avg_sq_scales`` (``adawarm.state``; ``None``
    for the other tensors).
    """
    if (warmup_steps == MEASURED) != (relative_updates is not None):
        raise ValueError(
            "warmup_steps='measured' needs relative_updates (one entry per tensor), and "
            f"relative_updates need warmup_steps='measured'; got warmup_steps={warmup_steps!r} "
            f"and relative_updates={'None' if relative_updates is None else 'given'}"
        )
    params, grads, exp_avgs, exp_avg_sqs = (
        local_tensors(tensors) for tensors in (params, grads, exp_avgs, exp_avg_sqs)
    )
    if compensations is not None:
        compensations = local_tensors(compensations)
    backend, torch_implementation = select_execution(backend, params, foreach=foreach, fused=fused)
    run_backend(
        backend,
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
        total_steps=total_steps,
        torch_implementation=torch_implementation,
        grad_scale=grad_scale,
        found_inf=found_inf,
        table_cache=table_cache,
        compensations=compensations,
        rounding_seed=rounding_seed,
        stochastic_params=stochastic_params,
        relative_updates=relative_updates,
        exp_avg_scales=exp_avg_scales,
        exp_avg_sq_scales=exp_avg_sq_scales,
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
    total_steps: int | None = None,
    table_cache: dict | None,
    **options,
) -> Tensor | None:
    """Run the step on a backend :func:`select_backend` has already approved for these tensors;
    with the measured warmup, return the factor it applied (a tensor)."""
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    options.update(beta2=beta2, warmup_steps=resolve_warmup_steps(warmup_steps, beta2, total_steps))
    if backend == "triton":
        # Under torch.compile the step is one custom op; eagerly the op's dispatch would only
        # add host time.
        step = triton_step_op if torch.compiler.is_compiling() else triton_step
        return step(*tensors, **options, table_cache=table_cache)
    return torch_step(*tensors, **options, implementation=torch_implementation)
