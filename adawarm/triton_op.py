"""The Triton step as a ``torch.library`` custom op, so that torch.compile records it as one node.

Under torch.compile the backend calls :func:`triton_step_op` instead of
:func:`adawarm.triton_backend.triton_step`: dynamo cannot trace the dispatch (it reads data
pointers to build the kernel's pointer tables), so the whole multi-tensor step is one opaque
operator that declares what it mutates. The compiled graph then keeps it in order with the ops
around it, with no graph break, and functionalization knows which inputs change.

Why not ``torch.library.triton_op``/``wrap_triton``: those make the kernel's own arguments
visible to the compiler and infer mutations from them, but this kernel reaches the tensors it
updates through int64 tables of data pointers, so the compiler would see only the tables and
could reorder reads of the parameters around the update. ``triton_op`` also traces its body
with fake tensors, which have no data pointers to put in the tables.
"""

from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from adawarm.triton_backend import triton_step

# Pointer tables of compiled steps, one cache per set of parameters (keyed by their data
# pointers); least recently used first. A compiled graph cannot carry the optimizer's own cache
# into the op, and each cache's tables are still checked against every pointer before use.
_MAX_TABLE_CACHES = 16
_table_caches: OrderedDict[tuple[int, ...], dict] = OrderedDict()


def _table_cache_for(params: Sequence[Tensor]) -> dict:
    key = tuple(param.data_ptr() for param in params)
    cache = _table_caches.pop(key, None)
    if cache is None:
        cache = {}
        if len(_table_caches) >= _MAX_TABLE_CACHES:
            _table_caches.popitem(last=False)
    _table_caches[key] = cache
    return cache


# The op's schema is inferred from these annotations. They are evaluated (no postponed
# annotations in this module) and optional arguments say typing.Optional, the form torch's schema
# inference has listed since custom_op appeared (torch 2.4); checked on torch 2.11 and 2.13.
@torch.library.custom_op(
    "adawarm::triton_step_",
    mutates_args=(
        "params",
        "exp_avgs",
        "exp_avg_sqs",
        "state_steps",
        "compensations",
        "relative_updates",
        "exp_avg_scales",
        "exp_avg_sq_scales",
    ),
)
def _triton_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    compensations: list[Tensor],
    compensation_positions: list[int],
    exp_avg_scales: list[Tensor],  # 8-bit moments' scales, at scales_positions; empty without
    exp_avg_sq_scales: list[Tensor],
    scales_positions: list[int],
    lr: float,
    lr_tensor: Optional[Tensor],  # noqa: UP045
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    maximize: bool,
    relative_updates: list[Tensor],  # the measured warmup's entries; empty without it
    grad_scale: Optional[Tensor] = None,  # noqa: UP045
    found_inf: Optional[Tensor] = None,  # noqa: UP045
    rounding_seed: Optional[int] = None,  # noqa: UP045
    stochastic_params: bool = False,
) -> None:
    aligned = _at_positions(compensations, compensation_positions, len(params))
    scales = {}
    if scales_positions:  # 8-bit moments
        scales = {
            "exp_avg_scales": _at_positions(exp_avg_scales, scales_positions, len(params)),
            "exp_avg_sq_scales": _at_positions(exp_avg_sq_scales, scales_positions, len(params)),
        }
    triton_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr if lr_tensor is None else lr_tensor,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        rectify=rectify,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        table_cache=_table_cache_for(params),
        compensations=aligned,
        rounding_seed=rounding_seed,
        stochastic_params=stochastic_params,
        relative_updates=relative_updates or None,
        **scales,
    )


def _at_positions(
    tensors: Sequence[Tensor], positions: Sequence[int], count: int
) -> list[Tensor | None]:
    """``count`` entries: ``tensors`` at ``positions``, None elsewhere."""
    entries: list[Tensor | None] = [None] * count
    for position, tensor in zip(positions, tensors, strict=True):
        entries[position] = tensor
    return entries


@_triton_step_.register_fake
def _(*args, **kwargs) -> None:
    # Everything the op does is an in-place update of inputs it declares as mutated.
    return None


def triton_step_op(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    table_cache: dict | None = None,
    compensations: Sequence[Tensor | None] | None = None,
    **options,
) -> None:
    """:func:`adawarm.triton_backend.triton_step` through the custom op, with the same arguments
    (the other hyper-parameters and ``grad_scale``/``found_inf``/``rounding_seed``/
    ``stochastic_params`` in ``options``, passed to the op by name).

    ``table_cache`` is not used: a compiled graph cannot pass a dict into an op, so the op keeps
    its own caches. Kahan buffers and 8-bit moments' scales travel as the present ones and
    their positions, because torch.compile cannot functionalize a mutated list with ``None``
    entries. The measured warmup's ``relative_updates`` (in ``options``) travel as a list,
    empty without it.
    """
    del table_cache
    options["relative_updates"] = list(options.get("relative_updates") or ())
    positions = [i for i, buffer in enumerate(compensations or ()) if buffer is not None]
    first_scales = options.pop("exp_avg_scales", None) or ()
    second_scales = options.pop("exp_avg_sq_scales", None) or ()
    scaled = [i for i, tensor in enumerate(first_scales) if tensor is not None]
    torch.ops.adawarm.triton_step_(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(state_steps),
        [compensations[i] for i in positions],
        positions,
        [first_scales[i] for i in scaled],
        [second_scales[i] for i in scaled],
        scaled,
        lr=0.0 if isinstance(lr, Tensor) else float(lr),
        lr_tensor=lr if isinstance(lr, Tensor) else None,
        **options,
    )
