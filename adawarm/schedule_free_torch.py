"""The PyTorch backend of AdaWarmScheduleFree: its step and its train/eval switches, any device.

A step applies one :class:`~adawarm.schedule.ScheduleFreeStep` to a *bucket*: tensors that share
device, dtype, step count and the average's state (``weight_sum``, ``lr_max``), in one of two
implementations -- ``reference``, one tensor at a time with plain tensor ops, and ``foreach``,
``torch._foreach_*`` ops over the bucket. No ``torch._fused_*`` kernel computes this update
(torch's fused Adam kernels keep a first moment and no averaged iterate), so there is no fused
implementation: on a GPU the Triton kernel is the fused one. As in
:mod:`adawarm.torch_backend`, lower-precision tensors are updated through fp32 working copies
and stored back: bf16 state by stochastic rounding (``z`` draws the stream of the first state
role, ``exp_avg_sq`` of the second), parameters to nearest even, with Kahan compensation or by
stochastic rounding. The gradients are read, never written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adawarm.rounding import SWITCH_ROLE, rounds_stochastically
from adawarm.schedule import ScheduleFreeStep, schedule_free_step
from adawarm.tensor_lists import (
    PackedTensors,
    add_number_,
    as_lists,
    constant_like,
    counter_values,
    indices_by_key,
    number_like,
    select_all,
    set_all,
)
from adawarm.torch_backend import (
    before_the_move,
    compute_dtype,
    group_by_device_and_dtype,
    measured_factor_of,
    real_views,
    record_relative_updates,
    store,
    store_bucket,
    store_compensated,
    store_stochastic,
    upcast,
    working_copies,
)

IMPLEMENTATIONS = ("reference", "foreach")


def _reference_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    schedule: ScheduleFreeStep,
    *,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    for y, grad, z, exp_avg_sq in zip(params, grads, zs, exp_avg_sqs, strict=True):
        if maximize:
            grad = -grad
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.div(schedule.bias_correction2).sqrt_().add_(schedule.eps)
        normalized = grad.div(denom)
        if weight_decay != 0.0:
            normalized.add_(y, alpha=weight_decay)  # decay at y, as schedulefree
        y.lerp_(z, schedule.average)
        y.add_(normalized, alpha=schedule.y_coefficient)
        z.sub_(normalized, alpha=schedule.lr)


def _foreach_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    schedule: ScheduleFreeStep,
    *,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    scratch: PackedTensors | None = None,
) -> None:
    # schedulefree's foreach ops, so that the two compute the same (numbers as 0-dim tensors:
    # tensor_lists.number_like says why); with a scratch for the gradients, on packed states.
    if scratch is not None:
        _packed_bucket(
            params,
            grads,
            zs,
            exp_avg_sqs,
            schedule,
            beta2=beta2,
            weight_decay=weight_decay,
            maximize=maximize,
            scratch=scratch,
        )
        return
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_mul_(exp_avg_sqs, constant_like(params[0], beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, number_like(params[0], schedule.bias_correction2))
    torch._foreach_sqrt_(denom)
    add_number_(denom, constant_like(params[0], schedule.eps))
    if weight_decay == 0.0:
        # addcdiv: the same update (up to rounding: value * grad / denom) without a list the
        # size of the parameters to allocate and fill, ~1/9 of the step on a CPU.
        torch._foreach_lerp_(params, zs, schedule.average)
        torch._foreach_addcdiv_(params, grads, denom, value=schedule.y_coefficient)
        torch._foreach_addcdiv_(zs, grads, denom, value=-schedule.lr)
        return
    normalized = torch._foreach_div(grads, denom)
    torch._foreach_add_(normalized, params, alpha=weight_decay)
    torch._foreach_lerp_(params, zs, schedule.average)
    torch._foreach_add_(params, normalized, alpha=schedule.y_coefficient)
    torch._foreach_sub_(zs, normalized, alpha=schedule.lr)


def _packed_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    zs: PackedTensors,
    exp_avg_sqs: PackedTensors,
    schedule: ScheduleFreeStep,
    *,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    scratch: PackedTensors,
) -> None:
    """:func:`_foreach_bucket` for packed states: the same ops in the same order, those that
    touch only states and gradients as one op on the packed tensors (the gradients copied into
    ``scratch``, which then holds the normalized step), those that touch the parameters as
    foreach ops over the views -- 4 ops a tensor instead of 10."""
    torch._foreach_copy_(scratch, grads)
    normalized, z, exp_avg_sq = scratch.base, zs.base, exp_avg_sqs.base
    if maximize:
        normalized.neg_()
    exp_avg_sq.mul_(beta2).addcmul_(normalized, normalized, value=1.0 - beta2)
    denom = exp_avg_sq.div(schedule.bias_correction2).sqrt_().add_(schedule.eps)
    normalized.div_(denom)
    if weight_decay != 0.0:
        torch._foreach_add_(scratch, params, alpha=weight_decay)  # decay at y, as schedulefree
    torch._foreach_lerp_(params, zs, schedule.average)
    torch._foreach_add_(params, scratch, alpha=schedule.y_coefficient)
    z.sub_(normalized, alpha=schedule.lr)


_BUCKET_STEPS = {"reference": _reference_bucket, "foreach": _foreach_bucket}


def schedule_free_torch_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    zs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    weight_sums: Sequence[Tensor],
    lr_maxes: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    r: float,
    weight_lr_power: float,
    maximize: bool,
    implementation: str | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
    gradient_scratch: PackedTensors | None = None,
    relative_updates: Sequence[Tensor] | None = None,
    relative_update_out: Sequence[Tensor] | None = None,
    exp_avg_sq_scales: Sequence[Tensor | None] | None = None,
) -> Tensor | None:
    """One schedule-free step over one parameter group's tensors, in train mode (``params``
    hold ``y``; ``warmup_steps`` resolved to an int). 8-bit (uint8) ``exp_avg_sqs`` come with
    their block scales in ``exp_avg_sq_scales`` (``None`` for the other tensors).

    Where ``zs`` and ``exp_avg_sqs`` are :class:`~adawarm.tensor_lists.PackedTensors` of the
    parameters' dtype and ``gradient_scratch`` one of their shapes (AdaWarmScheduleFree keeps
    a small group's states so), the ops that touch only states and gradients run once on the
    packed tensors.

    ``state_steps`` (fp32), ``weight_sums`` and ``lr_maxes`` (fp64) are scalar CPU tensors,
    advanced here. Stores round as in :func:`adawarm.torch_backend.torch_step`. With
    ``found_inf`` set (GradScaler) nothing changes; ``grad_scale`` divides the gradients.
    ``implementation=None`` is ``foreach``. ``relative_updates`` (the measured warmup) scale the
    rate as in :func:`adawarm.torch_backend.torch_step`, measured on ``z``, of whose move ``y``
    takes ``1 - beta1``; the averaging weights take the rate applied. Returns the factor
    applied, as :func:`adawarm.torch_backend.torch_step` does.
    """
    if found_inf is not None and bool(found_inf.item()):
        return None
    if not params:
        return None
    if grad_scale is not None:
        grads = torch._foreach_div(list(grads), grad_scale.to(grads[0].device))
    if isinstance(lr, Tensor):
        lr = float(lr.item())
    factor = None
    if relative_updates is not None:
        factor = measured_factor_of(relative_updates, lr * (1.0 - beta1))
        lr *= factor
    absent = [None] * len(params)
    lists = [params, grads, zs, exp_avg_sqs, state_steps, weight_sums, lr_maxes]
    lists += [compensations or absent, absent, exp_avg_sq_scales or absent]
    groups = group_by_device_and_dtype([*as_lists(lists), range(len(params))])
    for dtype, tensor_lists in groups:
        group_tensors, counters = tensor_lists[:4], tensor_lists[4:7]
        if dtype.is_complex:
            group_tensors = list(map(real_views, group_tensors))
        group_buffers, group_scales, group_positions = (
            tensor_lists[7],
            tensor_lists[8:10],
            tensor_lists[10],
        )
        for (previous_step, weight_sum, lr_max), indices in _buckets(*counters):
            schedule = schedule_free_step(
                previous_step + 1,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                warmup_steps=warmup_steps,
                rectify=rectify,
                r=r,
                weight_lr_power=weight_lr_power,
                lr_max=lr_max,
                weight_sum=weight_sum,
            )
            stored = select_all(group_tensors, indices)
            computing = compute_dtype(stored[0][0].dtype)
            scales = select_all(group_scales, indices)
            work = working_copies(stored, scales, computing)
            options = {"beta2": beta2, "weight_decay": weight_decay, "maximize": maximize}
            if _takes_packed_step(work, gradient_scratch, implementation):
                options["scratch"] = gradient_scratch
            before = None if relative_updates is None else before_the_move(work[2])
            _BUCKET_STEPS[implementation or "foreach"](*work, schedule, **options)
            buffers, positions = select_all((group_buffers, group_positions), indices)
            if before is not None:
                written = relative_update_out or relative_updates
                record_relative_updates(
                    [written[i] for i in positions], work[2], before, schedule.lr
                )
            store_bucket(
                stored,
                work,
                buffers=buffers,
                scales=scales,
                positions=positions,
                step=schedule.step,
                rounding_seed=rounding_seed,
                stochastic_params=stochastic_params,
            )
            # The bucket's tensors share their counters' new values (lr_max stays the same once
            # the warmup is over).
            changed = 2 if schedule.lr_max == lr_max else 3
            set_all(
                select_all(counters[:changed], indices),
                (schedule.step, schedule.weight_sum, schedule.lr_max)[:changed],
            )
    return None if factor is None else torch.tensor(factor, dtype=torch.float32)


def _takes_packed_step(
    work: list[Sequence[Tensor]], scratch: PackedTensors | None, implementation: str | None
) -> bool:
    """Whether a bucket's working lists are packed states (the whole group's, updated in
    place: no working copies) with a gradient scratch of their shapes."""
    zs, exp_avg_sqs = work[2], work[3]
    return (
        scratch is not None
        and implementation in (None, "foreach")
        and isinstance(zs, PackedTensors)
        and isinstance(exp_avg_sqs, PackedTensors)
        and len(scratch) == len(zs)
    )


def _buckets(
    steps: list[Tensor], weight_sums: list[Tensor], lr_maxes: list[Tensor]
) -> list[tuple[tuple[int, float, float], list[int] | None]]:
    """The distinct (step count, weight sum, rate maximum) and which tensors have each
    (``None``: all of them)."""
    values = map(counter_values, (steps, weight_sums, lr_maxes))
    keys = list(zip(*values, strict=True))
    return [((int(key[0]), key[1], key[2]), indices) for key, indices in indices_by_key(keys)]


def switch_torch(
    params: Sequence[Tensor],
    zs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    weight: float,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
    foreach: bool = True,
) -> None:
    """Move the parameters between ``y`` and ``x``: ``p <- p + weight (z - p)``, with
    ``weight = 1 - 1/beta1`` (train -> eval) or ``1 - beta1`` (eval -> train).

    A Kahan-compensated parameter moves from its compensated value ``p + buffer``; bf16
    parameters with ``stochastic_params`` round stochastically from the stream of role
    ``SWITCH_ROLE`` at the parameter's step count.
    """
    if not params:
        return
    if compensations is None:
        compensations = [None] * len(params)
    lists = [list(params), list(zs), list(state_steps), list(compensations)]
    groups = group_by_device_and_dtype([*lists, list(range(len(params)))], state_lists=(1,))
    for dtype, (group_params, group_zs, steps, buffers, positions) in groups:
        # One list of the parameters (or of their real views): store() skips its copy when the
        # working list is that list itself, as for fp32 parameters.
        group_params, group_zs = (
            real_views(tensors) if dtype.is_complex else list(tensors)
            for tensors in (group_params, group_zs)
        )
        computing = compute_dtype(group_params[0].dtype)
        work = upcast(group_params, computing)
        if buffers[0] is not None:
            torch._foreach_add_(work, upcast(list(buffers), computing))
        ends = upcast(group_zs, computing)
        if foreach:
            torch._foreach_lerp_(work, ends, weight)
        else:
            for moved, end in zip(work, ends, strict=True):
                moved.lerp_(end, weight)
        if buffers[0] is not None:
            # work already holds the buffer: the compensated store carries only the new residue
            torch._foreach_zero_(list(buffers))
            store_compensated(group_params, work, list(buffers))
        elif rounds_stochastically(dtype, rounding_seed, stochastic_params):
            for param, moved, position, step in zip(
                group_params, work, positions, steps, strict=True
            ):
                store_stochastic(
                    [param], [moved], [position], seed=rounding_seed, step=int(step.item()),
                    role=SWITCH_ROLE,
                )  # fmt: skip
        else:
            store(group_params, work)
