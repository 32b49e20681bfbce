"""The fused AdaWarmScheduleFree step and its train/eval switch: one Triton launch each.

A sibling of ``adawarm_step`` rather than a constexpr mode of it. The two share everything but
the arithmetic (``adawarm.kernels.common``): the launch layout and pointer tables, the alignment
check and the 16-byte accesses it allows, fp64 arguments, the warmup factor, the stores with
Kahan compensation or stochastic rounding and their random streams, the per-tensor counter that
lets a tensor's last program advance its state. What differs would have been a branch on nearly
every line of one kernel: the schedule (the average's ``weight_sum`` and ``lr_max`` are
per-tensor state the kernel reads and advances, besides the step), the update, and the scalars
written back; as siblings each keeps its own registers and machine-code checks.

The step reads y (the parameter), the gradient, z and v (``exp_avg_sq``) and writes y, z and v,
once each: 28 B per fp32 parameter, as AdamW. Each program:

1. loads its tensor's step, ``weight_sum`` and ``lr_max`` and computes the schedule of
   ``adawarm.schedule.schedule_free_step`` in fp64 (the tests check it against that function);
2. updates a block in fp32 -- ``v <- beta2 v + (1 - beta2) g^2``,
   ``u = g / (sqrt(v / (1 - beta2^t)) + eps) + wd y``,
   ``y <- y + average (z - y) + y_coefficient u``, ``z <- z - lr_t u`` -- and stores in the
   tensors' dtypes; the gradient is never written;
3. counts itself done; the tensor's last program writes the step, ``weight_sum`` and ``lr_max``
   back (every program has read them before its atomic increment).

With ``found_inf`` non-zero every program returns at once. The switch moves the parameters
between y and x, ``p <- p + w (z - p)``, in one pass over p and z.
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
    switch_stream_base,
)
from adawarm.kernels.measured import apply_measured_factor, store_part, sum_of_squares


@triton.jit
def _positive_power(base, exponent):
    """``base ** exponent`` for fp64 ``base >= 0`` and ``exponent >= 0`` (0 ** 0 = 1, as
    Python's), through exp2 and log2, which Triton's interpreter also has."""
    value = tl.exp2(exponent * tl.log2(tl.maximum(base, 1e-300)))
    value = tl.where(base == 0.0, 0.0, value)
    return tl.where(exponent == 0.0, 1.0, value)


@triton.jit
def _schedule(
    step,
    lr,
    lr_max,
    weight_sum,
    beta1,
    beta2,
    warmup_steps,
    r,
    weight_lr_power,
    RECTIFY: tl.constexpr,
):
    """The scalars of step ``step`` (fp64): see ``adawarm.schedule.schedule_free_step``.

    Returns (lr_t, lr_max, weight_sum, average, y_coefficient, bias_correction2).
    """
    t = step.to(tl.float64)
    beta2_t = power(beta2, step)
    bias_correction2 = 1.0 - beta2_t
    factor = ramp(t, warmup_steps)
    if RECTIFY:
        r_t, adaptive = rectification(t, beta2, beta2_t, bias_correction2)
        factor = factor * tl.where(adaptive, r_t, 0.0)
    lr_t = lr * factor
    lr_max = tl.maximum(lr_t, lr_max)
    weight = _positive_power(t, r) * _positive_power(lr_max, weight_lr_power)
    weight_sum = weight_sum + weight
    average = tl.where(weight_sum > 0.0, weight / tl.where(weight_sum > 0.0, weight_sum, 1.0), 0.0)
    y_coefficient = lr_t * (beta1 * (1.0 - average) - 1.0)
    return lr_t, lr_max, weight_sum, average, y_coefficient, bias_correction2


@triton.jit
def _update_block(
    param_ptr,
    grad_ptr,
    z_ptr,
    exp_avg_sq_ptr,
    compensation_ptr,
    exp_avg_sq_scales_ptr,
    second_code_ptr,
    offsets,
    numel,
    lr_t,
    average,
    y_coefficient,
    bias_correction2,
    eps,
    weight_decay,
    beta2,
    one_minus_beta2,
    grad_scale_ptr,
    param_base,
    z_base,
    exp_avg_sq_base,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    SECOND_STATE_DTYPE: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
    STOCHASTIC_STATE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MEASURED: tl.constexpr,
    FULL: tl.constexpr,
):
    """Update the elements at ``offsets``: load, compute in fp32, store in the tensors' dtypes
    (``FULL`` blocks need no mask, as in ``adawarm_step``; ``exp_avg_sq`` in
    ``SECOND_STATE_DTYPE``, which is uint8 for 8-bit codes beside an fp32 ``z``). Returns
    ``z``'s sums of the measured warmup (``adawarm.kernels.measured.block_sums``) when
    ``MEASURED``, else zeros."""
    if FULL:
        mask = None
    else:
        mask = offsets < numel
    y = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    z = tl.load(z_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg_sq = load_state(
        exp_avg_sq_ptr, exp_avg_sq_scales_ptr, offsets, mask, second_code_ptr,
        SECOND_STATE_DTYPE, True,
    )  # fmt: skip
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale_ptr)
    if MAXIMIZE:
        grad = -grad

    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    normalized = grad / (tl.sqrt(exp_avg_sq / bias_correction2) + eps) + weight_decay * y
    moved_sq = 0.0
    old_sq = 0.0
    if MEASURED:
        # z moves by lr_t times the normalized gradient: at rate 1, by that gradient itself
        # (summed here, z's old values need not stay live across the stores, where ptxas
        # spilled a register in sm_80 and sm_90 fp16 variants)
        moved_sq = sum_of_squares(normalized, mask, FULL)
        old_sq = sum_of_squares(z, mask, FULL)
    new_y = y + average * (z - y) + y_coefficient * normalized
    z = z - lr_t * normalized

    carried = y * 0.0
    if KAHAN:
        carried = tl.load(compensation_ptr + offsets, mask=mask).to(tl.float32)
    store_param(
        param_ptr, compensation_ptr, offsets, mask, new_y, y, carried, param_base,
        PARAM_DTYPE, KAHAN, STOCHASTIC_PARAM,
    )  # fmt: skip
    if SECOND_STATE_DTYPE == tl.uint8:  # z stays fp32
        store_state(z_ptr, offsets, mask, z, z_base, STATE_DTYPE, False)
        store_codes(
            exp_avg_sq_ptr, exp_avg_sq_scales_ptr, offsets, numel, mask, exp_avg_sq,
            exp_avg_sq_base, second_code_ptr, True, STOCHASTIC_STATE,
        )  # fmt: skip
    else:
        store_state(z_ptr, offsets, mask, z, z_base, STATE_DTYPE, STOCHASTIC_STATE)
        store_state(
            exp_avg_sq_ptr, offsets, mask, exp_avg_sq, exp_avg_sq_base, STATE_DTYPE,
            STOCHASTIC_STATE,
        )  # fmt: skip
    return moved_sq, old_sq


# Hyper-parameters, the warmup length and the seed are data, not compile-time choices.
@triton.jit(
    do_not_specialize=[
        "lr_bits",
        "beta1_bits",
        "beta2_bits",
        "eps_bits",
        "weight_decay_bits",
        "r_bits",
        "weight_lr_power_bits",
        "warmup_steps",
        "rounding_seed",
        "cap_bits",
    ]
)
def _schedule_free_step_kernel(
    param_ptrs,
    grad_ptrs,
    z_ptrs,
    exp_avg_sq_ptrs,
    step_ptrs,
    weight_sum_ptrs,
    lr_max_ptrs,
    compensation_ptrs,
    exp_avg_sq_scales_ptrs,
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
    r_bits,
    weight_lr_power_bits,
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
    SECOND_STATE_DTYPE: tl.constexpr,
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
        # y takes 1 - beta1 of z's move, which the sums measure; the averaging weights below
        # follow the rate applied
        moving_rate = rate * (1.0 - from_bits(beta1_bits))
        rate = apply_measured_factor(rate, moving_rate, group_sums_ptr, cap_bits, factor_ptr)
    pid = tl.program_id(0)
    tensor = tl.load(block_tensors + pid)
    step_ptr = tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))
    weight_sum_ptr = tl.load(weight_sum_ptrs + tensor).to(tl.pointer_type(tl.float64))
    lr_max_ptr = tl.load(lr_max_ptrs + tensor).to(tl.pointer_type(tl.float64))
    step = tl.load(step_ptr).to(tl.int64) + 1
    beta2 = from_bits(beta2_bits)
    lr_t, lr_max, weight_sum, average, y_coefficient, bias_correction2 = _schedule(
        step,
        rate,
        tl.load(lr_max_ptr),
        tl.load(weight_sum_ptr),
        from_bits(beta1_bits),
        beta2,
        warmup_steps,
        from_bits(r_bits),
        from_bits(weight_lr_power_bits),
        RECTIFY,
    )

    start = tl.load(block_starts + pid)
    numel = tl.load(numels + tensor)
    param_ptr = tl.load(param_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    z_ptr = tl.load(z_ptrs + tensor).to(tl.pointer_type(STATE_DTYPE))
    exp_avg_sq_ptr = tl.load(exp_avg_sq_ptrs + tensor).to(tl.pointer_type(SECOND_STATE_DTYPE))
    compensation_ptr = param_ptr  # read and written only when KAHAN
    if KAHAN:
        compensation_ptr = tl.load(compensation_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    eight_bit: tl.constexpr = SECOND_STATE_DTYPE == tl.uint8
    exp_avg_sq_scales_ptr = second_code_ptr  # read and written only by 8-bit states
    if eight_bit:
        exp_avg_sq_scales_ptr = tl.load(exp_avg_sq_scales_ptrs + tensor).to(
            tl.pointer_type(tl.float32)
        )
    if ALIGNED:
        # The launcher checked every streamed pointer of this launch against these alignments.
        param_ptr = tl.multiple_of(param_ptr, PARAM_ALIGN)
        grad_ptr = tl.multiple_of(grad_ptr, PARAM_ALIGN)
        compensation_ptr = tl.multiple_of(compensation_ptr, PARAM_ALIGN)
        z_ptr = tl.multiple_of(z_ptr, STATE_ALIGN)
        # the same elements an access as z's: 8-bit codes take a quarter of its bytes
        exp_avg_sq_ptr = tl.multiple_of(
            exp_avg_sq_ptr, STATE_ALIGN // 4 if eight_bit else STATE_ALIGN
        )
        start = tl.multiple_of(start, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    param_base, z_base, exp_avg_sq_base = stream_bases(
        rounding_seed, stream_ids, tensor, step, STOCHASTIC_PARAM, STOCHASTIC_STATE
    )
    scalars = (
        lr_t.to(tl.float32),
        average.to(tl.float32),
        y_coefficient.to(tl.float32),
        bias_correction2.to(tl.float32),
        from_bits(eps_bits).to(tl.float32),
        from_bits(weight_decay_bits).to(tl.float32),
        beta2.to(tl.float32),
        (1.0 - beta2).to(tl.float32),
    )
    bases = (param_base, z_base, exp_avg_sq_base)
    # An unaligned measured launch with Kahan buffers takes every block in halves: a whole
    # block's per-element addresses and the measured sums left ptxas one register short (a
    # spill) on sm_80 with fp16 parameters and every flag; without Kahan buffers, halves spilled
    # instead (sm_80, bf16 parameters and moments). MACHINE_CODE_VARIANTS=all checks each.
    if start + BLOCK <= numel and (ALIGNED or not MEASURED or not KAHAN):
        moved_sq, old_sq = _update_block(
            param_ptr, grad_ptr, z_ptr, exp_avg_sq_ptr, compensation_ptr, exp_avg_sq_scales_ptr,
            second_code_ptr, offsets, numel, *scalars, grad_scale_ptr, *bases, PARAM_DTYPE,
            STATE_DTYPE, SECOND_STATE_DTYPE, KAHAN, STOCHASTIC_PARAM, STOCHASTIC_STATE, MAXIMIZE,
            HAS_GRAD_SCALE, MEASURED, True,
        )  # fmt: skip
    else:
        # The masked tail in two halves (4 elements a thread), as in adawarm_step.
        moved_sq = 0.0
        old_sq = 0.0
        for half in range(2):
            half_offsets = start + half * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            half_moved_sq, half_old_sq = _update_block(
                param_ptr, grad_ptr, z_ptr, exp_avg_sq_ptr, compensation_ptr,
                exp_avg_sq_scales_ptr, second_code_ptr, half_offsets, numel, *scalars,
                grad_scale_ptr, *bases, PARAM_DTYPE, STATE_DTYPE, SECOND_STATE_DTYPE, KAHAN,
                STOCHASTIC_PARAM, STOCHASTIC_STATE, MAXIMIZE, HAS_GRAD_SCALE, MEASURED, False,
            )  # fmt: skip
            moved_sq += half_moved_sq
            old_sq += half_old_sq
    if MEASURED:
        # This block's part of its tensor's relative_update; the sums kernel adds them up.
        store_part(partials_ptr, pid, moved_sq, old_sq, scalars[0])  # lr_t in fp32

    blocks_of_tensor = tl.maximum(tl.cdiv(tl.load(numels + tensor), BLOCK), 1)
    if tl.atomic_add(done_counters + tensor, 1) == blocks_of_tensor - 1:
        # The pointers are loaded again rather than kept live across the block update: kept,
        # they pushed ptxas to spill a register to the stack (one STL and LDL a thread) in three
        # sm_90 variants with bf16 moments (56 registers; 48-52 loaded again).
        step_ptr = tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))
        tl.store(step_ptr, tl.load(step_ptr) + 1.0)
        tl.store(tl.load(weight_sum_ptrs + tensor).to(tl.pointer_type(tl.float64)), weight_sum)
        tl.store(tl.load(lr_max_ptrs + tensor).to(tl.pointer_type(tl.float64)), lr_max)
        tl.store(done_counters + tensor, 0)


@triton.jit
def _switch_block(
    param_ptr,
    z_ptr,
    compensation_ptr,
    offsets,
    numel,
    weight,
    base,
    PARAM_DTYPE: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
    FULL: tl.constexpr,
):
    if FULL:
        mask = None
    else:
        mask = offsets < numel
    stored = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    z = tl.load(z_ptr + offsets, mask=mask).to(tl.float32)
    value = stored
    if KAHAN:
        # Move the compensated value; the store then carries only the new rounding error.
        value = stored + tl.load(compensation_ptr + offsets, mask=mask).to(tl.float32)
    moved = value + weight * (z - value)
    store_param(
        param_ptr, compensation_ptr, offsets, mask, moved, stored, stored * 0.0, base,
        PARAM_DTYPE, KAHAN, STOCHASTIC_PARAM,
    )  # fmt: skip


@triton.jit(do_not_specialize=["weight_bits", "rounding_seed"])
def _switch_kernel(
    param_ptrs,
    z_ptrs,
    step_ptrs,
    compensation_ptrs,
    stream_ids,
    numels,
    block_tensors,
    block_starts,
    weight_bits,
    rounding_seed,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
    ALIGNED: tl.constexpr,
    PARAM_ALIGN: tl.constexpr,
    STATE_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensors + pid)
    start = tl.load(block_starts + pid)
    numel = tl.load(numels + tensor)
    param_ptr = tl.load(param_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    z_ptr = tl.load(z_ptrs + tensor).to(tl.pointer_type(STATE_DTYPE))
    compensation_ptr = param_ptr
    if KAHAN:
        compensation_ptr = tl.load(compensation_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE))
    if ALIGNED:
        param_ptr = tl.multiple_of(param_ptr, PARAM_ALIGN)
        compensation_ptr = tl.multiple_of(compensation_ptr, PARAM_ALIGN)
        z_ptr = tl.multiple_of(z_ptr, STATE_ALIGN)
        start = tl.multiple_of(start, BLOCK)
    base = start.to(tl.uint32)
    if STOCHASTIC_PARAM:
        step = tl.load(tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))).to(tl.int64)
        param_base, _, _ = stream_bases(rounding_seed, stream_ids, tensor, step, True, False)
        base = switch_stream_base(param_base)
    weight = from_bits(weight_bits).to(tl.float32)
    if start + BLOCK <= numel:
        offsets = start + tl.arange(0, BLOCK)
        _switch_block(
            param_ptr, z_ptr, compensation_ptr, offsets, numel, weight, base, PARAM_DTYPE,
            KAHAN, STOCHASTIC_PARAM, True,
        )  # fmt: skip
    else:
        for half in range(2):
            half_offsets = start + half * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            _switch_block(
                param_ptr, z_ptr, compensation_ptr, half_offsets, numel, weight, base,
                PARAM_DTYPE, KAHAN, STOCHASTIC_PARAM, False,
            )  # fmt: skip


def launch_schedule_free_step(
    tables: dict[str, torch.Tensor | int],
    *,
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    second_state_dtype: torch.dtype | None = None,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    r: float,
    weight_lr_power: float,
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
    """Launch one schedule-free step over the tensors of ``tables``
    (``adawarm.kernels.common.launch_tables`` of the lists "param", "z", "exp_avg_sq", "grad",
    "step", "weight_sum", "lr_max" and, for Kahan-compensated parameters, "compensation").
    ``group_sums`` and ``cap``: the measured warmup, measured on ``z``, as in
    ``adawarm_step.launch_adawarm_step``. ``second_state_dtype``: ``exp_avg_sq``'s, where it
    differs from ``z``'s ``state_dtype`` (uint8: 8-bit codes, with a table of their scales in
    ``tables``)."""
    second_state_dtype = second_state_dtype or state_dtype
    lr_is_tensor = isinstance(lr, torch.Tensor)
    grid = (tables["block_tensors"].numel(),)
    _schedule_free_step_kernel[grid](
        tables["param_ptrs"],
        tables["grad_ptrs"],
        tables["z_ptrs"],
        tables["exp_avg_sq_ptrs"],
        tables["step_ptrs"],
        tables["weight_sum_ptrs"],
        tables["lr_max_ptrs"],
        tables.get("compensation_ptrs", tables["numels"]),
        tables.get("exp_avg_sq_scales_ptrs", tables["numels"]),
        code_tables(second_state_dtype, tables["numels"])[1],
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
        float_bits(r),
        float_bits(weight_lr_power),
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
        SECOND_STATE_DTYPE=TRITON_DTYPES[second_state_dtype],
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
        enable_fp_fusion=ENABLE_FP_FUSION,  # as adawarm_step: the GPU computes what is tested
    )


def launch_switch(
    tables: dict[str, torch.Tensor | int],
    *,
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    weight: float,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
) -> None:
    """Launch ``p <- p + weight (z - p)`` over the tensors of ``tables`` (the lists "param",
    "z", "step" and, for Kahan-compensated parameters, "compensation")."""
    grid = (tables["block_tensors"].numel(),)
    _switch_kernel[grid](
        tables["param_ptrs"],
        tables["z_ptrs"],
        tables["step_ptrs"],
        tables.get("compensation_ptrs", tables["numels"]),
        tables.get("stream_ids", tables["numels"]),
        tables["numels"],
        tables["block_tensors"],
        tables["block_starts"],
        float_bits(weight),
        rounding_seed or 0,
        PARAM_DTYPE=TRITON_DTYPES[param_dtype],
        STATE_DTYPE=TRITON_DTYPES[state_dtype],
        KAHAN="compensation_ptrs" in tables,
        STOCHASTIC_PARAM=stochastic_params,
        ALIGNED=tables["aligned"],
        PARAM_ALIGN=tables["param_align"],
        STATE_ALIGN=tables["state_align"],
        BLOCK=tables["block_size"],
        num_warps=default_num_warps(tables["aligned"]),
        enable_fp_fusion=ENABLE_FP_FUSION,
    )


@triton.jit(do_not_specialize=["warmup_steps"])
def _schedule_kernel(
    steps_ptr,
    lr_maxes_ptr,
    weight_sums_ptr,
    out_ptr,
    lr_bits,
    beta1_bits,
    beta2_bits,
    warmup_steps,
    r_bits,
    weight_lr_power_bits,
    RECTIFY: tl.constexpr,
):
    """Write the kernel's schedule for each (step, lr_max, weight_sum) (tests check it against
    ``adawarm.schedule``): rows of (lr_t, lr_max, weight_sum, average, y_coefficient,
    bias_correction2). One program per row."""
    index = tl.program_id(0)
    values = _schedule(
        tl.load(steps_ptr + index),
        from_bits(lr_bits),
        tl.load(lr_maxes_ptr + index),
        tl.load(weight_sums_ptr + index),
        from_bits(beta1_bits),
        from_bits(beta2_bits),
        warmup_steps,
        from_bits(r_bits),
        from_bits(weight_lr_power_bits),
        RECTIFY,
    )
    row = out_ptr + 6 * index
    tl.store(row + 0, values[0])
    tl.store(row + 1, values[1])
    tl.store(row + 2, values[2])
    tl.store(row + 3, values[3])
    tl.store(row + 4, values[4])
    tl.store(row + 5, values[5])


def kernel_schedule(
    rows: list[tuple[int, float, float]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    warmup_steps: int,
    rectify: bool,
    r: float,
    weight_lr_power: float,
    device: torch.device,
) -> torch.Tensor:
    """The kernel's own schedule for ``rows`` of (step, lr_max before it, weight_sum before it):
    an fp64 tensor of rows (lr_t, lr_max, weight_sum, average, y_coefficient,
    bias_correction2)."""
    steps = torch.tensor([row[0] for row in rows], dtype=torch.int64, device=device)
    lr_maxes = torch.tensor([row[1] for row in rows], dtype=torch.float64, device=device)
    weight_sums = torch.tensor([row[2] for row in rows], dtype=torch.float64, device=device)
    out = torch.empty((len(rows), 6), dtype=torch.float64, device=device)
    _schedule_kernel[(len(rows),)](
        steps,
        lr_maxes,
        weight_sums,
        out,
        float_bits(lr),
        float_bits(beta1),
        float_bits(beta2),
        warmup_steps,
        float_bits(r),
        float_bits(weight_lr_power),
        RECTIFY=rectify,
    )
    return out
