"""The fused AdaWarm step: one Triton launch updates any number of tensors.

The launcher receives int64 tables of data pointers (params, grads, exp_avg, exp_avg_sq, step
counters, and Kahan buffers when used), one entry per tensor, and per-block tables mapping each
program to a tensor and an element offset. Each program:

1. loads its tensor's step counter ``s`` (fp32, on the device) and computes the whole schedule for
   ``t = s + 1`` in fp64 -- the same formulas as ``adawarm.schedule``, which the tests check it
   against. fp64 matters: RAdam's ``rho_t`` loses too much to cancellation in fp32. Powers are
   taken by repeated squaring (multiplications only), so no libdevice function is needed;
2. loads a block of param, grad and moments, computes in fp32, and stores in the tensors' dtypes
   (parameters rounding to nearest even, Kahan-compensated or stochastically; bf16 moments
   stochastically -- constexpr switches);
3. counts itself done on a per-tensor counter; the tensor's last program writes ``t`` back to the
   step counter and resets the counter. Every program has read the step before its atomic
   (acq_rel) increment, so no program can see the new step; a tensor of zero elements still gets
   one (fully masked) program, so its step advances too.

With ``found_inf`` non-zero every program returns at once: nothing changes, not even the step.
Hyper-parameters arrive as fp64 bit patterns in int64 arguments: a Python float argument would
be rounded to fp32, and ``1 - beta2`` of an fp32 0.999 is 1.3e-5 off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adawarm.kernels.common import (
    ENABLE_FP_FUSION,
    TRITON_DTYPES,
    code_tables,
    default_num_warps,
    float_bits,
    from_bits,
    load_state,
    power,
    ramp,
    rectification,
    store_codes,
    store_param,
    store_state,
    stream_bases,
)
from adawarm.kernels.measured import apply_measured_factor, store_part, sum_of_squares


@triton.jit
def _schedule(step, lr, beta1, beta2, eps, weight_decay, warmup_steps, RECTIFY: tl.constexpr):
    """The scalars of step ``step`` (fp64): see ``adawarm.schedule.step_schedule``.

    Returns (decay, step_size, bias_correction2_sqrt, eps_t, adaptive).
    """
    t = step.to(tl.float64)
    lr_t = lr * ramp(t, warmup_steps)
    beta2_t = power(beta2, step)
    bias_correction1 = 1.0 - power(beta1, step)
    bias_correction2 = 1.0 - beta2_t
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    if RECTIFY:
        r_t, adaptive = rectification(t, beta2, beta2_t, bias_correction2)
        scale = tl.where(adaptive, r_t, 1.0)
        eps_t = eps / bias_correction2_sqrt
    else:
        adaptive = t > 0.0
        scale = t * 0.0 + 1.0
        eps_t = eps * 1.0
    step_size = lr_t * scale / bias_correction1
    decay = 1.0 - lr_t * weight_decay
    return decay, step_size, bias_correction2_sqrt, eps_t, adaptive


@triton.jit
def _update_block(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    compensation_ptr,
    exp_avg_scales_ptr,
    exp_avg_sq_scales_ptr,
    first_code_ptr,
    second_code_ptr,
    offsets,
    numel,
    decay,
    step_size,
    bias_correction2_sqrt,
    eps_t,
    adaptive,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    grad_scale_ptr,
    param_base,
    exp_avg_base,
    exp_avg_sq_base,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
    STOCHASTIC_STATE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MEASURED: tl.constexpr,
    FULL: tl.constexpr,
):
    """Update the elements at ``offsets``: load, compute in fp32 (the scalars arrive in fp32),
    store in the tensors' dtypes. ``FULL`` blocks lie wholly inside their tensor and need no
    mask, which lets the loads and stores of an aligned launch be 128-bit (a mask computed from
    a loaded ``numel`` has no known constancy, so a masked access is split into scalar ones).

    Returns the sums of the squared move (the new fp32 value minus the old, before the store
    rounds it) and of the squared old values when ``MEASURED``, else zeros."""
    if FULL:
        mask = None
    else:
        mask = offsets < numel
    old_param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = load_state(
        exp_avg_ptr, exp_avg_scales_ptr, offsets, mask, first_code_ptr, STATE_DTYPE, False
    )
    exp_avg_sq = load_state(
        exp_avg_sq_ptr, exp_avg_sq_scales_ptr, offsets, mask, second_code_ptr, STATE_DTYPE, True
    )
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale_ptr)
    if MAXIMIZE:
        grad = -grad

    param = old_param * decay
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps_t
    denom = tl.where(adaptive, denom, 1.0)
    param = param - step_size * (exp_avg / denom)

    carried = param * 0.0
    if KAHAN:
        carried = tl.load(compensation_ptr + offsets, mask=mask).to(tl.float32)
    store_param(
        param_ptr, compensation_ptr, offsets, mask, param, old_param, carried, param_base,
        PARAM_DTYPE, KAHAN, STOCHASTIC_PARAM,
    )  # fmt: skip
    if STATE_DTYPE == tl.uint8:
        store_codes(
            exp_avg_ptr, exp_avg_scales_ptr, offsets, numel, mask, exp_avg, exp_avg_base,
            first_code_ptr, False, STOCHASTIC_STATE,
        )  # fmt: skip
        store_codes(
            exp_avg_sq_ptr, exp_avg_sq_scales_ptr, offsets, numel, mask, exp_avg_sq,
            exp_avg_sq_base, second_code_ptr, True, STOCHASTIC_STATE,
        )  # fmt: skip
    else:
        store_state(
            exp_avg_ptr, offsets, mask, exp_avg, exp_avg_base, STATE_DTYPE, STOCHASTIC_STATE
        )
        store_state(
            exp_avg_sq_ptr, offsets, mask, exp_avg_sq, exp_avg_sq_base, STATE_DTYPE,
            STOCHASTIC_STATE,
        )  # fmt: skip
    moved_sq = 0.0
    old_sq = 0.0
    if MEASURED:  # the move as stored (before rounding), and the old values
        moved_sq = sum_of_squares(param - old_param, mask, FULL)
        old_sq = sum_of_squares(old_param, mask, FULL)
    return moved_sq, old_sq


# Hyper-parameters, the warmup length and the seed are data, not compile-time choices: without
# this, Triton would compile another variant whenever one of them equals 1.
@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "beta1_bits",
        "beta2_bits",
        "eps_bits",
        "weight_decay_bits",
        "warmup_steps",
        "rounding_seed",
        "cap_bits",
    ]
)
def _adawarm_step_kernel(
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    exp_avg_sq_ptrs,
    step_ptrs,
    compensation_ptrs,
    exp_avg_scales_ptrs,
    exp_avg_sq_scales_ptrs,
    first_code_ptr,
    second_code_ptr,
    stream_ids,
    numels,
    block_tensors,
    block_starts,
    done_counters,
    lr_bits,
    lr_ptr,
    beta1_bits,
    beta2_bits,
    eps_bits,
    weight_decay_bits,
    warmup_steps,
    rounding_seed,
    grad_scale_ptr,
    found_inf_ptr,
    group_sums_ptr,
    partials_ptr,
    factor_ptr,
    cap_bits,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
    STOCHASTIC_STATE: tl.constexpr,
    RECTIFY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_FROM_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    MEASURED: tl.constexpr,
    ALIGNED: tl.constexpr,
    PARAM_ALIGN: tl.constexpr,
    STATE_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    if LR_FROM_TENSOR:
        rate = tl.load(lr_ptr).to(tl.float64)
    else:
        rate = from_bits(lr_bits)
    if MEASURED:
        rate = apply_measured_factor(rate, rate, group_sums_ptr, cap_bits, factor_ptr)
    pid = tl.program_id(0)
    tensor = tl.load(block_tensors + pid)
    step_ptr = tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr).to(tl.int64) + 1

    beta1 = from_bits(beta1_bits)
    beta2 = from_bits(beta2_bits)
    decay, step_size, bias_correction2_sqrt, eps_t, adaptive = _schedule(
        step,
        rate,
        beta1,
        beta2,
        from_bits(eps_bits),
        from_bits(weight_decay_bits),
        warmup_steps,
        RECTIFY,
    )

    # Loaded after the schedule: values live across its fp64-division subroutine calls are
    # saved to the stack by ptxas on sm_80 (a spill to the machine-code check).
    start = tl.load(block_starts + pid)
    numel = tl.load(numels + tensor)
    param_ptr = tl.load(param_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    exp_avg_ptr = tl.load(exp_avg_ptrs + tensor).to(tl.pointer_type(STATE_DTYPE))
    exp_avg_sq_ptr = tl.load(exp_avg_sq_ptrs + tensor).to(tl.pointer_type(STATE_DTYPE))
    compensation_ptr = param_ptr  # read and written only when KAHAN
    if KAHAN:
        compensation_ptr = tl.load(compensation_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    eight_bit: tl.constexpr = STATE_DTYPE == tl.uint8
    # the states' block scales, read and written only by 8-bit states
    exp_avg_scales_ptr = first_code_ptr
    exp_avg_sq_scales_ptr = first_code_ptr
    if eight_bit:
        scales_type: tl.constexpr = tl.pointer_type(tl.float32)
        exp_avg_scales_ptr = tl.load(exp_avg_scales_ptrs + tensor).to(scales_type)
        exp_avg_sq_scales_ptr = tl.load(exp_avg_sq_scales_ptrs + tensor).to(scales_type)
    if ALIGNED:
        # The launcher checked every pointer of this launch against these alignments (pointers
        # loaded from a table carry none), and block starts are multiples of BLOCK.
        param_ptr = tl.multiple_of(param_ptr, PARAM_ALIGN)
        grad_ptr = tl.multiple_of(grad_ptr, PARAM_ALIGN)
        compensation_ptr = tl.multiple_of(compensation_ptr, PARAM_ALIGN)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, STATE_ALIGN)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, STATE_ALIGN)
        start = tl.multiple_of(start, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    param_base, exp_avg_base, exp_avg_sq_base = stream_bases(
        rounding_seed, stream_ids, tensor, step, STOCHASTIC_PARAM, STOCHASTIC_STATE
    )
    # fp32 once, before the two block paths: fp64 scalars kept live into them take two registers
    # each, which pushed ptxas to spill in the heaviest variants (sm_80, every flag).
    scalars = (
        decay.to(tl.float32),
        step_size.to(tl.float32),
        bias_correction2_sqrt.to(tl.float32),
        eps_t.to(tl.float32),
        adaptive,
        1.0 - beta1.to(tl.float32),
        beta2.to(tl.float32),
        (1.0 - beta2).to(tl.float32),
    )
    bases = (param_base, exp_avg_base, exp_avg_sq_base)
    # fp32 before the block: an fp64 rate kept live across it took two registers, which ptxas
    # spilled in sm_90 variants.
    applied = rate.to(tl.float32)
    states = (exp_avg_scales_ptr, exp_avg_sq_scales_ptr, first_code_ptr, second_code_ptr)
    if start + BLOCK <= numel:
        moved_sq, old_sq = _update_block(
            param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, compensation_ptr, *states, offsets,
            numel, *scalars, grad_scale_ptr, *bases, PARAM_DTYPE, STATE_DTYPE,
            KAHAN, STOCHASTIC_PARAM, STOCHASTIC_STATE, MAXIMIZE, HAS_GRAD_SCALE, MEASURED, True,
        )  # fmt: skip
    else:
        # The masked tail in two halves, one after the other (4 elements a thread): 8 masked
        # elements a thread made ptxas keep a register on the stack in an sm_80 variant.
        moved_sq = 0.0
        old_sq = 0.0
        for half in range(2):
            half_start = start + half * (BLOCK // 2)
            half_offsets = half_start + tl.arange(0, BLOCK // 2)
            half_moved_sq, half_old_sq = _update_block(
                param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, compensation_ptr, *states,
                half_offsets, numel, *scalars, grad_scale_ptr, *bases, PARAM_DTYPE,
                STATE_DTYPE, KAHAN, STOCHASTIC_PARAM, STOCHASTIC_STATE, MAXIMIZE, HAS_GRAD_SCALE,
                MEASURED, False,
            )  # fmt: skip
            moved_sq += half_moved_sq
            old_sq += half_old_sq
    if MEASURED:
        # This block's part of its tensor's relative_update, the move at rate 1; the sums
        # kernel adds them up.
        at_rate_1 = tl.where(applied > 0.0, applied, 1.0)
        store_part(partials_ptr, pid, moved_sq / at_rate_1 / at_rate_1, old_sq, applied)

    # numel loaded again (a cached scalar) rather than kept live across the block update, which
    # made ptxas save it to the stack in some variants.
    blocks_of_tensor = tl.maximum(tl.cdiv(tl.load(numels + tensor), BLOCK), 1)
    if tl.atomic_add(done_counters + tensor, 1) == blocks_of_tensor - 1:
        # Loaded again rather than kept: no other program writes the counter, and a value live
        # across the schedule's fp64-division subroutine calls is saved to the stack (one STL
        # and LDL a thread, which the machine-code check counts as a spill).
        tl.store(step_ptr, tl.load(step_ptr) + 1.0)
        tl.store(done_counters + tensor, 0)


# Specialising on an int argument equal to 1 would turn warmup_steps = 1 into a constant and
# compile another variant; values are data here, not compile-time choices.
@triton.jit(do_not_specialize=["warmup_steps"])
def _schedule_kernel(
    steps_ptr,
    out_ptr,
    lr_bits,
    beta1_bits,
    beta2_bits,
    eps_bits,
    weight_decay_bits,
    warmup_steps,
    RECTIFY: tl.constexpr,
):
    """Write the kernel's schedule for each step in ``steps_ptr`` (tests check it against
    ``adawarm.schedule``): rows of (decay, step_size, bias_correction2_sqrt, eps, adaptive).
    One program per step."""
    index = tl.program_id(0)
    step = tl.load(steps_ptr + index)
    decay, step_size, bias_correction2_sqrt, eps_t, adaptive = _schedule(
        step,
        from_bits(lr_bits),
        from_bits(beta1_bits),
        from_bits(beta2_bits),
        from_bits(eps_bits),
        from_bits(weight_decay_bits),
        warmup_steps,
        RECTIFY,
    )
    row = out_ptr + 5 * index
    tl.store(row + 0, decay)
    tl.store(row + 1, step_size)
    tl.store(row + 2, bias_correction2_sqrt)
    tl.store(row + 3, eps_t)
    tl.store(row + 4, adaptive.to(tl.float64))


def launch_adawarm_step(
    tables: dict[str, torch.Tensor | int],
    *,
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
    stochastic_state: bool = False,
    group_sums: torch.Tensor | None = None,
    cap: float = 0.0,
    num_warps: int | None = None,
) -> None:
    """Launch one AdaWarm step over the tensors described by ``tables``.

    With ``group_sums`` (the measured warmup: fp32 ``(update_sq, param_sq)`` of the group on
    the device) the rate is multiplied by the measured factor under ``cap``, and each program
    writes its block's part of the sums to ``tables["partials"]``
    (``adawarm.kernels.measured``).

    ``stochastic_params`` stores bf16 parameters, ``stochastic_state`` bf16 moments, by
    stochastic rounding from ``rounding_seed`` (with a ``stream_ids`` table).

    ``tables`` comes from :func:`launch_tables`: device tensors int64 ``param_ptrs``,
    ``grad_ptrs``, ``exp_avg_ptrs``, ``exp_avg_sq_ptrs``, ``step_ptrs``, ``numels`` and, for
    Kahan-compensated parameters, ``compensation_ptrs`` (one entry per tensor), the per-program
    ``block_tensors``/``block_starts`` from :func:`block_tables`, int32 ``done_counters`` (zeros,
    one per tensor, kept between launches), and the ``block_size`` they were laid out for.
    ``num_warps`` is for tuning (``python -m bench tune``); None: :func:`default_num_warps`.
    """
    lr_is_tensor = isinstance(lr, torch.Tensor)
    grid = (tables["block_tensors"].numel(),)
    _adawarm_step_kernel[grid](
        tables["param_ptrs"],
        tables["grad_ptrs"],
        tables["exp_avg_ptrs"],
        tables["exp_avg_sq_ptrs"],
        tables["step_ptrs"],
        tables.get("compensation_ptrs", tables["numels"]),
        tables.get("exp_avg_scales_ptrs", tables["numels"]),
        tables.get("exp_avg_sq_scales_ptrs", tables["numels"]),
        *code_tables(state_dtype, tables["numels"]),
        tables.get("stream_ids", tables["numels"]),
        tables["numels"],
        tables["block_tensors"],
        tables["block_starts"],
        tables["done_counters"],
        0 if lr_is_tensor else float_bits(lr),
        lr if lr_is_tensor else tables["numels"],
        float_bits(beta1),
        float_bits(beta2),
        float_bits(eps),
        float_bits(weight_decay),
        warmup_steps,
        rounding_seed or 0,
        grad_scale if grad_scale is not None else tables["numels"],
        found_inf if found_inf is not None else tables["numels"],
        group_sums if group_sums is not None else tables["numels"],
        tables.get("partials", tables["numels"]),
        tables.get("factor", tables["numels"]),
        float_bits(cap),
        PARAM_DTYPE=TRITON_DTYPES[param_dtype],
        STATE_DTYPE=TRITON_DTYPES[state_dtype],
        KAHAN="compensation_ptrs" in tables,
        STOCHASTIC_PARAM=stochastic_params,
        STOCHASTIC_STATE=stochastic_state,
        RECTIFY=rectify,
        MAXIMIZE=maximize,
        LR_FROM_TENSOR=lr_is_tensor,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        MEASURED=group_sums is not None,
        ALIGNED=tables["aligned"],
        PARAM_ALIGN=tables["param_align"],
        STATE_ALIGN=tables["state_align"],
        BLOCK=tables["block_size"],
        num_warps=default_num_warps(tables["aligned"]) if num_warps is None else num_warps,
        # No FMA contraction: each product is rounded before the add, as in the interpreter
        # and in torch's separate ops, so the GPU computes what the interpreted tests check
        # (bit for bit in the stochastic-rounding and fp32 paths), at no cost to a kernel
        # bound by memory.
        enable_fp_fusion=ENABLE_FP_FUSION,
    )


def kernel_schedule(
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    device: torch.device,
) -> torch.Tensor:
    """The kernel's own schedule for ``steps``: an fp64 tensor of rows (decay, step_size,
    bias_correction2_sqrt, eps, adaptive)."""
    steps_tensor = torch.tensor(steps, dtype=torch.int64, device=device)
    out = torch.empty((len(steps), 5), dtype=torch.float64, device=device)
    _schedule_kernel[(len(steps),)](
        steps_tensor,
        out,
        float_bits(lr),
        float_bits(beta1),
        float_bits(beta2),
        float_bits(eps),
        float_bits(weight_decay),
        warmup_steps,
        RECTIFY=rectify,
    )
    return out
