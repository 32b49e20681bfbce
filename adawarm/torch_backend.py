"""The PyTorch backend: the AdaWarm step on any device, in three implementations.

All three apply the same :class:`~adawarm.schedule.StepSchedule` to a *bucket*: tensors that share
device, parameter dtype, state dtype and step count, so one set of scalars serves them all.

- ``reference``: one tensor at a time with plain tensor ops, the formula as written.
- ``foreach``: ``torch._foreach_*`` ops over the whole bucket.
- ``fused``: ``torch._fused_adamw_`` (torch's fused AdamW kernel, which runs at about the memory
  limit on CPU). It takes lr, eps and weight decay per call and computes the bias corrections
  from the step tensors, so a rectified step is an AdamW step with ``lr_t r_t`` as the rate,
  ``eps / sqrt(1 - beta2^t)`` as eps and ``wd / r_t`` as weight decay (so the decay stays
  ``lr_t wd``). A momentum-only step is not an AdamW step; the fused implementation hands those
  buckets to ``foreach``.

Every implementation works on fp32 (fp64 for fp64 parameters) copies of lower-precision tensors;
the driver makes the copies and stores the results back: bf16 and 8-bit moments by stochastic
rounding, parameters rounding to nearest even, with Kahan compensation or by stochastic
rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter

import torch
from torch import Tensor

from adawarm.quantization import EIGHT_BIT, STATE_CODES, dequantize, store_quantized
from adawarm.rounding import (
    EXP_AVG_ROLE,
    EXP_AVG_SQ_ROLE,
    PARAM_ROLE,
    rounds_stochastically,
    stochastic_round_to_bf16,
    stream_base,
)
from adawarm.schedule import StepSchedule, measured_factor, step_schedule
from adawarm.tensor_lists import (
    DEVICE,
    DTYPE,
    add_number_,
    as_lists,
    constant_like,
    counter_values,
    indices_by_key,
    number_like,
    select,
    select_all,
    set_all,
)

IMPLEMENTATIONS = ("reference", "foreach", "fused")
_FIRST = itemgetter(0)


# torch >= 2.4 has it for CPU tensors.
_HAS_FUSED_ADAMW = hasattr(torch, "_fused_adamw_")


def fused_available(tensor: Tensor) -> bool:
    """Whether torch's fused AdamW kernel serves ``tensor``'s device with CPU step counters."""
    # The CUDA fused kernel wants its step counters on the GPU; ours live on the CPU, as in
    # torch.optim.AdamW without fused/capturable, so state_dicts interchange unchanged.
    return tensor.is_cpu and _HAS_FUSED_ADAMW


def _reference_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    schedule: StepSchedule,
    *,
    beta1: float,
    beta2: float,
    maximize: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if maximize:
            grad = -grad
        param.mul_(schedule.decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if schedule.adaptive:
            denom = (exp_avg_sq.sqrt() / schedule.bias_correction2_sqrt).add_(schedule.eps)
            param.addcdiv_(exp_avg, denom, value=-schedule.step_size)
        else:
            param.add_(exp_avg, alpha=-schedule.step_size)


def _foreach_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    schedule: StepSchedule,
    *,
    beta1: float,
    beta2: float,
    maximize: bool,
) -> None:
    if maximize:
        grads = torch._foreach_neg(grads)
    if schedule.decay != 1.0:
        torch._foreach_mul_(params, number_like(params[0], schedule.decay))
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, constant_like(params[0], beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    if schedule.adaptive:
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, number_like(params[0], schedule.bias_correction2_sqrt))
        add_number_(denom, number_like(params[0], schedule.eps))
        torch._foreach_addcdiv_(params, exp_avgs, denom, -schedule.step_size)
    else:
        torch._foreach_add_(params, exp_avgs, alpha=-schedule.step_size)


def _fused_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    schedule: StepSchedule,
    *,
    beta1: float,
    beta2: float,
    maximize: bool,
    steps: list[Tensor],
    weight_decay: float,
) -> None:
    foreach_options = {"beta1": beta1, "beta2": beta2, "maximize": maximize}
    if not (schedule.adaptive and fused_available(params[0])):
        _foreach_bucket(params, grads, exp_avgs, exp_avg_sqs, schedule, **foreach_options)
        return
    # The fused kernel walks raw memory as if every tensor were contiguous, which silently
    # mixes up elements of a strided tensor. Gradients are copied to contiguous memory (one extra
    # read and write of those gradients only); non-contiguous parameters, which only arise from
    # user-built layouts, take the foreach path. The moments always share their parameter's
    # strides (the optimizer creates and loads them with the parameter's memory format).
    strided = (
        []
        if all(map(Tensor.is_contiguous, params))
        else [i for i, param in enumerate(params) if not param.is_contiguous()]
    )
    if strided:
        _foreach_bucket(
            *(select(tensors, strided) for tensors in (params, grads, exp_avgs, exp_avg_sqs)),
            schedule,
            **foreach_options,
        )
        strided_set = set(strided)
        dense = [i for i in range(len(params)) if i not in strided_set]
        if not dense:
            return
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            select(tensors, dense) for tensors in (params, grads, exp_avgs, exp_avg_sqs, steps)
        )
    if not all(map(Tensor.is_contiguous, grads)):
        grads = [grad.contiguous() for grad in grads]
    # The kernel computes p *= 1 - lr * wd; with lr = lr_t r_t, wd / r_t keeps the decay lr_t wd.
    rate = schedule.lr * schedule.rectification
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        lr=rate,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay / schedule.rectification,
        eps=schedule.eps,
        amsgrad=False,
        maximize=maximize,
    )


def real_views(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Complex tensors as real ones with a trailing (real, imaginary) dimension, sharing their
    memory: as in torch.optim's Adam family, a complex number is a pair of independent reals
    (each with its own second moment). Converting them to a real dtype instead would drop the
    imaginary part."""
    return [torch.view_as_real(tensor) for tensor in tensors]


def upcast_all(lists: list[list[Tensor]], dtype: torch.dtype) -> list[list[Tensor]]:
    """:func:`upcast` of each list: ``lists`` itself when all are in ``dtype`` already."""
    if set(map(DTYPE, map(_FIRST, lists))) == {dtype}:
        return lists
    return [upcast(tensors, dtype) for tensors in lists]


def upcast(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The tensors themselves when already in ``dtype``, otherwise working copies in it."""
    if tensors[0].dtype == dtype:
        return tensors
    return [tensor.to(dtype) for tensor in tensors]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in: fp64 for fp64 tensors, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def working_copies(
    stored: list[Sequence[Tensor]],
    scales: Sequence[Sequence[Tensor | None]],
    dtype: torch.dtype,
) -> list[Sequence[Tensor]]:
    """:func:`upcast_all` of a bucket's (params, grads, first state, second state), with 8-bit
    states decoded from their codes and ``scales`` (those of the first and second state)."""
    states = stored[2:4]
    if EIGHT_BIT not in (states[0][0].dtype, states[1][0].dtype):
        return upcast_all(stored, dtype)
    work = [upcast(stored[0], dtype), upcast(stored[1], dtype)]
    for tensors, tensor_scales, code in zip(states, scales, STATE_CODES, strict=True):
        if tensors[0].dtype == EIGHT_BIT:
            work.append(list(map(dequantize, tensors, tensor_scales, [code] * len(tensors))))
        else:
            work.append(upcast(tensors, dtype))
    return work


def store(targets: list[Tensor], work: list[Tensor]) -> None:
    """Write fp32/fp64 working copies back to lower-precision tensors (round to nearest even)."""
    if work is not targets:
        torch._foreach_copy_(targets, work)


def store_stochastic(
    targets: list[Tensor],
    work: list[Tensor],
    positions: list[int],
    *,
    seed: int,
    step: int,
    role: int,
) -> None:
    """Store fp32 working copies into bf16 ``targets`` by stochastic rounding, tensor ``k`` of
    the backend's lists drawing the stream keyed by ``(seed, k, step, role)``."""
    for target, new, position in zip(targets, work, positions, strict=True):
        target.copy_(stochastic_round_to_bf16(new, stream_base(seed, position, step, role)))


def store_compensated(params: list[Tensor], work: list[Tensor], buffers: list[Tensor]) -> None:
    """Kahan-compensated store of the new parameters ``work`` into low-precision ``params``.

    The update ``work - old``, plus the rounding error carried in ``buffers``, is added to the
    old parameter; what rounding to the parameter dtype loses of it goes back into ``buffers``,
    so updates below half an ulp accumulate instead of vanishing.
    """
    old = upcast(params, work[0].dtype)
    update = torch._foreach_sub(work, old)
    torch._foreach_add_(update, upcast(buffers, work[0].dtype))
    new = torch._foreach_add(old, update)
    torch._foreach_copy_(params, new)
    applied = torch._foreach_sub(upcast(params, work[0].dtype), old)
    torch._foreach_sub_(update, applied)
    torch._foreach_copy_(buffers, update)


def torch_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    maximize: bool,
    implementation: str | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
    relative_updates: Sequence[Tensor] | None = None,
    relative_update_out: Sequence[Tensor] | None = None,
    exp_avg_scales: Sequence[Tensor | None] | None = None,
    exp_avg_sq_scales: Sequence[Tensor | None] | None = None,
) -> Tensor | None:
    """One AdaWarm step over one parameter group's tensors (``warmup_steps`` resolved to an int).

    The update is computed in fp32 (fp64 for fp64 tensors) and stored in each tensor's dtype.
    8-bit (uint8) moments come with their block scales in ``exp_avg_scales`` and
    ``exp_avg_sq_scales`` (``None`` for the other tensors; ``adawarm.quantization``).
    With ``rounding_seed`` set, bf16 and 8-bit moments are stored by stochastic rounding
    (``adawarm.rounding``: the stream of tensor ``k`` of these lists at step ``t`` is keyed by
    ``(rounding_seed, k, t)`` and the moment's role), and so are bf16 parameters when
    ``stochastic_params``; everything else rounds to nearest even (``rounding_seed=None``: every
    store, the biased form). ``compensations`` (Kahan buffers, ``None`` for tensors without one)
    turns the parameters' store into a compensated one.

    ``implementation=None`` picks ``fused`` where torch has the kernel for the device and
    ``foreach`` elsewhere. With ``found_inf`` set (GradScaler), nothing changes, not even the step
    counters; ``grad_scale`` divides the gradients before use.

    ``relative_updates`` (the measured warmup; pairs on the CPU, one per tensor) scale
    the rate by :func:`~adawarm.schedule.measured_factor` of their sums, and are replaced by
    the sums of this step (:func:`record_relative_updates`) -- or those go to
    ``relative_update_out`` where given (shards' sums, for the optimizer to add up over
    ranks); the factor applied is returned (a float32 CPU tensor; None without them, or where
    nothing stepped).
    """
    if implementation is None:
        implementation = "fused"
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
        factor = measured_factor_of(relative_updates, lr)
        lr *= factor

    absent = [None] * len(params)
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps, compensations or absent]
    lists += [exp_avg_scales or absent, exp_avg_sq_scales or absent]
    groups = group_by_device_and_dtype([*as_lists(lists), range(len(params))])
    options = {"beta1": beta1, "beta2": beta2, "maximize": maximize}
    for dtype, tensor_lists in groups:
        (group_params, group_grads, group_exp_avgs, group_exp_avg_sqs) = tensor_lists[:4]
        group_steps, group_buffers = tensor_lists[4:6]
        group_scales, group_positions = tensor_lists[6:8], tensor_lists[8]
        if dtype.is_complex:
            group_params, group_grads, group_exp_avgs, group_exp_avg_sqs = map(
                real_views, (group_params, group_grads, group_exp_avgs, group_exp_avg_sqs)
            )
        for previous, indices in indices_by_key(counter_values(group_steps)):
            previous_step = int(previous)
            step = previous_step + 1
            schedule = step_schedule(
                step,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                warmup_steps=warmup_steps,
                rectify=rectify,
            )
            stored = select_all(
                (group_params, group_grads, group_exp_avgs, group_exp_avg_sqs), indices
            )
            computing = compute_dtype(stored[0][0].dtype)
            scales = select_all(group_scales, indices)
            work = working_copies(stored, scales, computing)
            before = None if relative_updates is None else before_the_move(work[0])
            # Counters advance with their bucket (the fused kernel reads them), and go back if
            # the bucket's update fails: each tensor is either stepped or untouched.
            bucket_steps = select(group_steps, indices)
            set_all([bucket_steps], [step])
            try:
                if implementation == "fused":
                    extra = {"steps": bucket_steps, "weight_decay": weight_decay}
                    _fused_bucket(*work, schedule, **options, **extra)
                else:
                    _BUCKET_STEPS[implementation](*work, schedule, **options)
            except BaseException:
                set_all([bucket_steps], [previous_step])
                raise
            buffers, positions = select_all((group_buffers, group_positions), indices)
            if before is not None:
                written = relative_update_out or relative_updates
                record_relative_updates(
                    [written[i] for i in positions], work[0], before, schedule.lr
                )
            store_bucket(
                stored,
                work,
                buffers=buffers,
                scales=scales,
                positions=positions,
                step=step,
                rounding_seed=rounding_seed,
                stochastic_params=stochastic_params,
            )

    return None if factor is None else torch.tensor(factor, dtype=torch.float32)


def measured_factor_of(relative_updates: Sequence[Tensor], lr: float) -> float:
    """:func:`~adawarm.schedule.measured_factor` at ``lr`` of the sums of these entries."""
    return measured_factor(lr, *torch.stack(list(relative_updates)).sum(0).tolist())


def before_the_move(tensors: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """What :func:`record_relative_updates` needs of the measured tensors before the step:
    copies of them, and their norms (taken now: no pass over the copies later)."""
    return [tensor.clone() for tensor in tensors], torch.stack(torch._foreach_norm(tensors))


def record_relative_updates(
    entries: Sequence[Tensor],
    tensors: Sequence[Tensor],
    before: tuple[list[Tensor], Tensor],
    rate: float,
) -> None:
    """Set each tensor's ``relative_update`` entry to ``(||(t - t_before) / rate||^2,
    ||t_before||^2)``: the measured tensor's move at rate 1 and its size before the step (kept
    as they were at rate 0, where nothing was measured). ``before`` is
    :func:`before_the_move`'s, whose copies this turns into the moves in place (CPU copies
    are page-faulted in when allocated: one allocation, not three, is ~2x faster on 4M
    elements)."""
    if rate == 0.0:
        return
    copies, sizes = before
    torch._foreach_sub_(copies, tensors)  # minus each move
    moved = torch.stack(torch._foreach_norm(copies)) / rate
    sums = torch.stack([moved, sizes], dim=1).square().cpu()
    for entry, values in zip(entries, sums, strict=True):
        entry.copy_(values)


def store_bucket(
    stored: list[Sequence[Tensor]],
    work: list[Sequence[Tensor]],
    *,
    buffers: Sequence[Tensor | None],
    scales: Sequence[Sequence[Tensor | None]],
    positions: Sequence[int],
    step: int,
    rounding_seed: int | None,
    stochastic_params: bool,
) -> None:
    """Store a bucket's working copies: ``stored``/``work`` are the (params, grads, first state,
    second state) lists, ``scales`` the block scales of 8-bit states. The states round
    stochastically when bf16 or 8-bit (streams of roles ``EXP_AVG_ROLE`` and
    ``EXP_AVG_SQ_ROLE``; 8-bit ones to the nearest code without a seed), the parameters with
    Kahan ``buffers``, by stochastic rounding (``stochastic_params``) or to nearest even."""
    if work is stored and buffers[0] is None:
        return  # the update ran on the tensors themselves
    stochastic = {"seed": rounding_seed, "step": step}
    for role, states, new, state_scales, code in zip(
        (EXP_AVG_ROLE, EXP_AVG_SQ_ROLE), stored[2:4], work[2:4], scales, STATE_CODES, strict=True
    ):
        if states[0].dtype == EIGHT_BIT:
            store_quantized(
                states, state_scales, new, code, positions=positions, **stochastic, role=role
            )
        elif rounds_stochastically(states[0].dtype, rounding_seed):
            store_stochastic(states, new, positions, **stochastic, role=role)
        else:
            store(states, new)
    params = stored[0]
    if buffers[0] is not None:
        store_compensated(params, work[0], buffers)
    elif rounds_stochastically(params[0].dtype, rounding_seed, stochastic_params):
        store_stochastic(params, work[0], positions, **stochastic, role=PARAM_ROLE)
    else:
        store(params, work[0])


def group_by_device_and_dtype(
    tensor_lists: list[list[Tensor]], state_lists: Sequence[int] = (2, 3)
) -> list[tuple[torch.dtype, list[list[Tensor]]]]:
    """Split parallel lists by the (device, dtype) of the first list's tensors (the parameters)
    and the dtypes of the lists at ``state_lists`` (the states: 8-bit for large tensors only).

    A group's parameters either all or none have a Kahan buffer (that follows from the
    parameter dtype and the group's options). A plain loop: torch's C++ grouping checks every
    list and costs ~3 us per tensor.
    """
    params = tensor_lists[0]
    dtypes, devices = list(map(DTYPE, params)), list(map(DEVICE, params))
    state_dtypes = list(zip(*(map(DTYPE, tensor_lists[i]) for i in state_lists), strict=True))
    if (
        dtypes.count(dtypes[0]) == len(dtypes)
        and devices.count(devices[0]) == len(devices)
        and state_dtypes.count(state_dtypes[0]) == len(state_dtypes)
    ):
        return [(dtypes[0], tensor_lists)]  # the common case: the lists as they are
    groups = indices_by_key(list(zip(devices, dtypes, state_dtypes, strict=True)))
    return [
        (key[1], [select(tensors, indices) for tensors in tensor_lists]) for key, indices in groups
    ]


_BUCKET_STEPS: dict[str, Callable[..., None]] = {
    "reference": _reference_bucket,
    "foreach": _foreach_bucket,
}
