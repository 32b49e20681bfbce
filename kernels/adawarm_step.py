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

import struct

import torch
import triton
import triton.language as tl

from adawarm.rounding import EXP_AVG_ROLE, EXP_AVG_SQ_ROLE
from adawarm.schedule import RECTIFICATION_THRESHOLD

# Elements per program and warps. Untuned: `python -m bench tune` measures the alternatives on a
# GPU (none has been available yet); 1024 elements per program with 4 warps is the Triton
# tutorials' choice for memory-bound element-wise kernels.
BLOCK_SIZE = 1024
NUM_WARPS = 4
# A launch without alignment hints moves one element per access, each with its own 64-bit
# address, so 8 elements a thread cost registers: with bf16 moments stored stochastically and
# Kahan buffers, 134-140 on sm_90 at 4 warps (over the 128 that keeps 16 warps per SM); 8 warps
# (4 elements a thread) take at most 64 (tests/test_kernel_machine_code.py).
UNALIGNED_NUM_WARPS = 8


def default_num_warps(aligned: bool) -> int:
    """The warps of a launch with (``NUM_WARPS``) or without alignment hints."""
    return NUM_WARPS if aligned else UNALIGNED_NUM_WARPS


# FMA contraction off; see the launch in launch_adawarm_step.
ENABLE_FP_FUSION = False
# RAdam takes the adaptive step only while rho_t exceeds this (defined in adawarm.schedule).
_RECTIFICATION_THRESHOLD = tl.constexpr(RECTIFICATION_THRESHOLD)
# The moments' random streams (adawarm.rounding.stream_base).
_EXP_AVG_ROLE = tl.constexpr(EXP_AVG_ROLE)
_EXP_AVG_SQ_ROLE = tl.constexpr(EXP_AVG_SQ_ROLE)

TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _from_bits(bits):
    """The fp64 number whose bit pattern ``bits`` holds; Triton types small ints as int32."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _mix32(x):
    """The lowbias32 hash of ``adawarm.rounding.mix32`` on uint32 values: uint32 products wrap
    mod 2^32 and shifts are logical, so this is the reference's arithmetic in 32-bit registers
    (an int64 form with 16-bit halves took twice the registers: 116-142 per thread with triton
    3.6 for the bf16-moment variants, against 64-69 with this)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B  # above 2^31: Triton types the literal uint32
    return x ^ (x >> 16)


@triton.jit
def _stochastic_round_to_bf16(value, base, offsets):
    """``adawarm.rounding.stochastic_round_to_bf16`` for one block: the same random bits."""
    noise = _mix32(base + offsets.to(tl.uint32) * 0x9E3779B9) & 0xFFFF
    # Finite values cannot carry past bit 31 (the largest is 0x7F7FFFFF, or 0xFF7FFFFF with the
    # sign); non-finite ones are restored below.
    bits = (value.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True)
    finite = tl.abs(value) <= 3.4028234663852886e38
    return tl.where(finite, rounded, value).to(tl.bfloat16)


@triton.jit
def _power(base, exponent):
    """``base ** exponent`` for an integer exponent >= 0, by repeated squaring."""
    result = base * 0.0 + 1.0
    remaining = exponent
    while remaining > 0:
        if remaining % 2 == 1:
            result = result * base
        base = base * base
        remaining = remaining // 2
    return result


@triton.jit
def _round_to(value, PARAM_DTYPE: tl.constexpr):
    """Cast fp32 ``value`` to ``PARAM_DTYPE`` (a parameter's or state's), rounding to nearest-even.

    bf16 is rounded explicitly: Triton's interpreter truncates fp32 -> bf16, and explicit
    rounding makes the interpreter, the GPU and torch's casts agree bit for bit.
    """
    if PARAM_DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        # NaN payloads can carry into the exponent; keep NaN as NaN.
        return tl.where(value != value, value, rounded).to(tl.bfloat16)
    else:
        return value.to(PARAM_DTYPE)


@triton.jit
def _schedule(step, lr, beta1, beta2, eps, weight_decay, warmup_steps, RECTIFY: tl.constexpr):
    """The scalars of step ``step`` (fp64): see ``adawarm.schedule.step_schedule``.

    Returns (decay, step_size, bias_correction2_sqrt, eps_t, adaptive).
    """
    t = step.to(tl.float64)
    ramp = tl.minimum(t / tl.maximum(warmup_steps, 1).to(tl.float64), 1.0)
    ramp = tl.where(warmup_steps == 0, 1.0, ramp)
    lr_t = lr * ramp
    beta2_t = _power(beta2, step)
    bias_correction1 = 1.0 - _power(beta1, step)
    bias_correction2 = 1.0 - beta2_t
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    if RECTIFY:
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * t * beta2_t / bias_correction2
        adaptive = rho_t > _RECTIFICATION_THRESHOLD
        rho_t_safe = tl.where(adaptive, rho_t, rho_inf)
        rectification = tl.sqrt(
            (rho_t_safe - 4.0)
            * (rho_t_safe - 2.0)
            * rho_inf
            / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t_safe)
        )
        scale = tl.where(adaptive, rectification, 1.0)
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
    FULL: tl.constexpr,
):
    """Update the elements at ``offsets``: load, compute in fp32 (the scalars arrive in fp32),
    store in the tensors' dtypes. ``FULL`` blocks lie wholly inside their tensor and need no
    mask, which lets the loads and stores of an aligned launch be 128-bit (a mask computed from
    a loaded ``numel`` has no known constancy, so a masked access is split into scalar ones)."""
    if FULL:
        mask = None
    else:
        mask = offsets < numel
    old_param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
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

    if KAHAN:
        # Compensated store (as adawarm.torch_backend): the update plus the carried rounding
        # error is added to the old value; what rounding loses of it is carried on.
        carried = tl.load(compensation_ptr + offsets, mask=mask).to(tl.float32)
        update = (param - old_param) + carried
        stored = _round_to(old_param + update, PARAM_DTYPE)
        carried = update - (stored.to(tl.float32) - old_param)
        tl.store(param_ptr + offsets, stored, mask=mask)
        tl.store(compensation_ptr + offsets, _round_to(carried, PARAM_DTYPE), mask=mask)
    elif STOCHASTIC_PARAM:
        rounded = _stochastic_round_to_bf16(param, param_base, offsets)
        tl.store(param_ptr + offsets, rounded, mask=mask)
    else:
        tl.store(param_ptr + offsets, _round_to(param, PARAM_DTYPE), mask=mask)
    if STOCHASTIC_STATE:
        # bf16 moments round stochastically: to nearest, an update below half an ulp of the
        # moment is lost, and the moments stall (adawarm.rounding).
        exp_avg = _stochastic_round_to_bf16(exp_avg, exp_avg_base, offsets)
        exp_avg_sq = _stochastic_round_to_bf16(exp_avg_sq, exp_avg_sq_base, offsets)
    else:
        exp_avg = _round_to(exp_avg, STATE_DTYPE)
        exp_avg_sq = _round_to(exp_avg_sq, STATE_DTYPE)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)


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
    ]
)
def _adawarm_step_kernel(
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    exp_avg_sq_ptrs,
    step_ptrs,
    compensation_ptrs,
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
    ALIGNED: tl.constexpr,
    PARAM_ALIGN: tl.constexpr,
    STATE_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0)
    tensor = tl.load(block_tensors + pid)
    step_ptr = tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr).to(tl.int64) + 1

    beta1 = _from_bits(beta1_bits)
    beta2 = _from_bits(beta2_bits)
    if LR_FROM_TENSOR:
        rate = tl.load(lr_ptr).to(tl.float64)
    else:
        rate = _from_bits(lr_bits)
    decay, step_size, bias_correction2_sqrt, eps_t, adaptive = _schedule(
        step,
        rate,
        beta1,
        beta2,
        _from_bits(eps_bits),
        _from_bits(weight_decay_bits),
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
    # The keys of the random streams (adawarm.rounding.stream_base), used only when stochastic.
    param_base = step.to(tl.uint32)
    exp_avg_base = param_base
    exp_avg_sq_base = param_base
    if STOCHASTIC_PARAM or STOCHASTIC_STATE:
        # uint32 arithmetic wraps: the reference's "mod 2^32"
        stream = tl.load(stream_ids + tensor).to(tl.uint32)
        inner = stream * 0x9E3779B9 + step.to(tl.uint32)
        param_base = _mix32(rounding_seed.to(tl.uint32) ^ _mix32(inner))
        if STOCHASTIC_STATE:
            exp_avg_base = _mix32(param_base ^ _EXP_AVG_ROLE)
            exp_avg_sq_base = _mix32(param_base ^ _EXP_AVG_SQ_ROLE)
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
    if start + BLOCK <= numel:
        _update_block(
            param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, compensation_ptr, offsets, numel,
            *scalars, grad_scale_ptr, *bases, PARAM_DTYPE, STATE_DTYPE,
            KAHAN, STOCHASTIC_PARAM, STOCHASTIC_STATE, MAXIMIZE, HAS_GRAD_SCALE, True,
        )  # fmt: skip
    else:
        # The masked tail in two halves, one after the other (4 elements a thread): 8 masked
        # elements a thread made ptxas keep a register on the stack in an sm_80 variant.
        for half in range(2):
            half_offsets = start + half * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            _update_block(
                param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, compensation_ptr, half_offsets,
                numel, *scalars, grad_scale_ptr, *bases, PARAM_DTYPE, STATE_DTYPE,
                KAHAN, STOCHASTIC_PARAM, STOCHASTIC_STATE, MAXIMIZE, HAS_GRAD_SCALE, False,
            )  # fmt: skip

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
        _from_bits(lr_bits),
        _from_bits(beta1_bits),
        _from_bits(beta2_bits),
        _from_bits(eps_bits),
        _from_bits(weight_decay_bits),
        warmup_steps,
        RECTIFY,
    )
    row = out_ptr + 5 * index
    tl.store(row + 0, decay)
    tl.store(row + 1, step_size)
    tl.store(row + 2, bias_correction2_sqrt)
    tl.store(row + 3, eps_t)
    tl.store(row + 4, adaptive.to(tl.float64))


def float_bits(value: float) -> int:
    """The IEEE fp64 bit pattern of ``value`` as a signed int64, for exact fp64 kernel arguments."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def block_tables(
    numels: list[int], device: torch.device, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-program tables: the tensor each program updates and the element offset it starts at.

    A tensor gets ``ceil(numel / block_size)`` programs, and one when it is empty.
    """
    counts = [max(1, triton.cdiv(numel, block_size)) for numel in numels]
    tensors = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(counts))
    first_block = torch.cumsum(torch.tensor([0, *counts[:-1]]), 0)
    starts = (torch.arange(len(tensors)) - first_block[tensors]) * block_size
    return tensors.to(torch.int32).to(device), starts.to(torch.int64).to(device)


# The widest access a thread makes: 16 bytes (LDG.E.128 / STG.E.128).
VECTOR_BYTES = 16
# Tables of these lists hold data the kernel streams; the other lists (step counters) it does not.
_PARAM_LISTS = ("param", "grad", "compensation")
_STATE_LISTS = ("exp_avg", "exp_avg_sq")


def vector_alignments(param_dtype: torch.dtype, state_dtype: torch.dtype) -> tuple[int, int]:
    """The byte alignments the kernel may assume of parameter-dtype and state-dtype pointers.

    Every streamed array gets the same number of elements per access, as many as 16 bytes of
    the widest dtype hold: bf16 parameters with fp32 moments move 4 elements per access (8 and
    16 bytes), because 8 bf16 elements (16 bytes) against 4 fp32 ones would make Triton convert
    between the two layouts through shared memory.
    """
    param_size = torch.empty((), dtype=param_dtype).element_size()
    state_size = torch.empty((), dtype=state_dtype).element_size()
    elements = VECTOR_BYTES // max(param_size, state_size)
    return elements * param_size, elements * state_size


def launch_tables(
    lists: dict[str, list[torch.Tensor]],
    device: torch.device,
    *,
    pointers: tuple[tuple[int, ...], ...] | None = None,
    stream_ids: list[int] | None = None,
    block_size: int = BLOCK_SIZE,
) -> dict[str, torch.Tensor | int]:
    """The tables :func:`launch_adawarm_step` walks, on ``device``.

    ``lists`` maps "param", "grad", "exp_avg", "exp_avg_sq", "step" and optionally
    "compensation" to one tensor per parameter (checked by the caller); ``pointers`` are their
    data pointers in that order when the caller has them already. ``stream_ids`` numbers the
    tensors' random streams for stochastic rounding. The program layout is built for
    ``block_size``, which the tables carry so that the launch uses the same.
    """
    if pointers is None:
        pointers = tuple(tuple(t.data_ptr() for t in tensors) for tensors in lists.values())
    param_align, state_align = vector_alignments(lists["param"][0].dtype, lists["exp_avg"][0].dtype)
    # Alignment is checked, never assumed: one pointer off (a view at an odd storage offset)
    # and the whole launch takes the variant without alignment hints.
    aligned = all(
        pointer % (param_align if name in _PARAM_LISTS else state_align) == 0
        for name, row in zip(lists, pointers, strict=True)
        if name in _PARAM_LISTS or name in _STATE_LISTS
        for pointer in row
    )
    numels = [param.numel() for param in lists["param"]]
    block_tensors, block_starts = block_tables(numels, device, block_size)
    table = torch.tensor(pointers, dtype=torch.int64)
    tables: dict[str, torch.Tensor | int] = {
        f"{name}_ptrs": table[index].to(device) for index, name in enumerate(lists)
    }
    tables.update(
        numels=torch.tensor(numels, dtype=torch.int64, device=device),
        block_tensors=block_tensors,
        block_starts=block_starts,
        done_counters=torch.zeros(len(numels), dtype=torch.int32, device=device),
        block_size=block_size,
        aligned=aligned,
        param_align=param_align,
        state_align=state_align,
    )
    if stream_ids is not None:
        tables["stream_ids"] = torch.tensor(stream_ids, dtype=torch.int32, device=device)
    return tables


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
    num_warps: int | None = None,
) -> None:
    """Launch one AdaWarm step over the tensors described by ``tables``.

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
