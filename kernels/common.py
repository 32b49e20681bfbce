"""What the fused steps share (``adawarm_step``, ``schedule_free_step``): the launch layout,
pointer tables and their alignment, fp64 arguments, the warmup factor, and the stores with their
rounding and random streams.

Every launch walks int64 tables of data pointers (one entry per tensor) and per-program tables
mapping each program to a tensor and an element offset; the host checks every streamed pointer's
alignment and tells the kernel (``ALIGNED``), so full blocks move 16 bytes per access.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from adawarm.quantization import FIRST_MOMENT, QUANTIZATION_BLOCK, SECOND_MOMENT
from adawarm.rounding import EXP_AVG_ROLE, EXP_AVG_SQ_ROLE, SWITCH_ROLE
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
# The states' random streams (adawarm.rounding.stream_base), and the schedule-free switch's.
_FIRST_STATE_ROLE = tl.constexpr(EXP_AVG_ROLE)
_SECOND_STATE_ROLE = tl.constexpr(EXP_AVG_SQ_ROLE)
_SWITCH_ROLE = tl.constexpr(SWITCH_ROLE)
# Elements per scale of 8-bit states.
_QUANTIZATION_BLOCK = tl.constexpr(QUANTIZATION_BLOCK)

TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.uint8: tl.uint8,  # 8-bit states' codes
}


@triton.jit
def from_bits(bits):
    """The fp64 number whose bit pattern ``bits`` holds; Triton types small ints as int32."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def mix32(x):
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
def random_bits(base, offsets):
    """``adawarm.rounding.random_bits`` of the elements at ``offsets``: 16 bits each."""
    return mix32(base + offsets.to(tl.uint32) * 0x9E3779B9) & 0xFFFF


@triton.jit
def stochastic_round_to_bf16(value, base, offsets):
    """``adawarm.rounding.stochastic_round_to_bf16`` for one block: the same random bits."""
    noise = random_bits(base, offsets)
    # Finite values cannot carry past bit 31 (the largest is 0x7F7FFFFF, or 0xFF7FFFFF with the
    # sign); non-finite ones are restored below.
    bits = (value.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True)
    finite = tl.abs(value) <= 3.4028234663852886e38
    return tl.where(finite, rounded, value).to(tl.bfloat16)


@triton.jit
def stream_bases(
    rounding_seed,
    stream_ids,
    tensor,
    step,
    STOCHASTIC_PARAM: tl.constexpr,
    STOCHASTIC_STATE: tl.constexpr,
):
    """The keys of the random streams of a tensor's parameter and its two states at ``step``
    (``adawarm.rounding.stream_base``), computed only when something rounds stochastically."""
    param_base = step.to(tl.uint32)
    first_base = param_base
    second_base = param_base
    if STOCHASTIC_PARAM or STOCHASTIC_STATE:
        # uint32 arithmetic wraps: the reference's "mod 2^32"
        stream = tl.load(stream_ids + tensor).to(tl.uint32)
        inner = stream * 0x9E3779B9 + step.to(tl.uint32)
        param_base = mix32(rounding_seed.to(tl.uint32) ^ mix32(inner))
        if STOCHASTIC_STATE:
            first_base = mix32(param_base ^ _FIRST_STATE_ROLE)
            second_base = mix32(param_base ^ _SECOND_STATE_ROLE)
    return param_base, first_base, second_base


@triton.jit
def switch_stream_base(param_base):
    """The key of the stream a schedule-free train/eval switch rounds a parameter with."""
    return mix32(param_base ^ _SWITCH_ROLE)


@triton.jit
def power(base, exponent):
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
def ramp(t, warmup_steps):
    """``min(1, t / W)`` for the fp64 step ``t`` (1 when ``W = 0``): adawarm.schedule.ramp."""
    ramp_t = tl.minimum(t / tl.maximum(warmup_steps, 1).to(tl.float64), 1.0)
    return tl.where(warmup_steps == 0, 1.0, ramp_t)


@triton.jit
def rectification(t, beta2, beta2_t, bias_correction2):
    """RAdam's ``r_t`` at the fp64 step ``t`` and whether the step is adaptive (``rho_t > 5``):
    adawarm.schedule.rectification (``r_t`` is only meaningful where adaptive)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2_t / bias_correction2
    adaptive = rho_t > _RECTIFICATION_THRESHOLD
    rho_t_safe = tl.where(adaptive, rho_t, rho_inf)
    r_t = tl.sqrt(
        (rho_t_safe - 4.0)
        * (rho_t_safe - 2.0)
        * rho_inf
        / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t_safe)
    )
    return r_t, adaptive


@triton.jit
def round_to(value, PARAM_DTYPE: tl.constexpr):
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
def store_param(
    param_ptr,
    compensation_ptr,
    offsets,
    mask,
    param,
    old_param,
    carried,
    base,
    PARAM_DTYPE: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
):
    """Store the fp32 ``param`` in the parameter dtype: Kahan-compensated (from ``old_param``,
    the stored value it was computed from, and ``carried``, the error carried so far), by
    stochastic rounding from the stream ``base``, or to nearest even."""
    if KAHAN:
        # Compensated store (as adawarm.torch_backend): the update plus the carried rounding
        # error is added to the old value; what rounding loses of it is carried on.
        update = (param - old_param) + carried
        stored = round_to(old_param + update, PARAM_DTYPE)
        carried = update - (stored.to(tl.float32) - old_param)
        tl.store(param_ptr + offsets, stored, mask=mask)
        tl.store(compensation_ptr + offsets, round_to(carried, PARAM_DTYPE), mask=mask)
    elif STOCHASTIC_PARAM:
        rounded = stochastic_round_to_bf16(param, base, offsets)
        tl.store(param_ptr + offsets, rounded, mask=mask)
    else:
        tl.store(param_ptr + offsets, round_to(param, PARAM_DTYPE), mask=mask)


@triton.jit
def store_state(
    state_ptr, offsets, mask, value, base, STATE_DTYPE: tl.constexpr, STOCHASTIC_STATE: tl.constexpr
):
    """Store the fp32 ``value`` of a state tensor in the state dtype. bf16 states round
    stochastically: to nearest, an update below half an ulp of the value is lost, and the state
    stalls (adawarm.rounding)."""
    if STOCHASTIC_STATE:
        stored = stochastic_round_to_bf16(value, base, offsets)
    else:
        stored = round_to(value, STATE_DTYPE)
    tl.store(state_ptr + offsets, stored, mask=mask)


@triton.jit
def load_state(
    state_ptr, scales_ptr, offsets, mask, code_ptr, STATE_DTYPE: tl.constexpr, ROOT: tl.constexpr
):
    """A state's fp32 values at ``offsets``: 8-bit codes (``STATE_DTYPE`` uint8) decoded by
    ``adawarm.quantization.dequantize`` from their table at ``code_ptr`` and their blocks'
    scales (squared for a ``ROOT`` code), others cast."""
    if STATE_DTYPE == tl.uint8:
        codes = tl.load(state_ptr + offsets, mask=mask)
        scales = tl.load(scales_ptr + offsets // _QUANTIZATION_BLOCK, mask=mask)
        value = tl.load(code_ptr + codes.to(tl.int32)) * scales
        if ROOT:
            value = value * value
    else:
        value = tl.load(state_ptr + offsets, mask=mask).to(tl.float32)
    return value


@triton.jit
def store_codes(
    codes_ptr, scales_ptr, offsets, numel, mask, value, base, code_ptr,
    ROOT: tl.constexpr, STOCHASTIC: tl.constexpr,
):  # fmt: skip
    """``adawarm.quantization.quantize`` of a program's fp32 ``value``, whole blocks from a
    block's first element (its start is a multiple of the block): each block's largest
    magnitude (of the square root for a ``ROOT`` code) is its scale, and each element takes
    the lower or upper of its neighbouring codes -- the upper with probability its distance
    from the lower over the gap, from the stream ``base`` (``STOCHASTIC``), else the nearer.
    The codes are found by a binary search of the table, 8 halvings."""
    stored = value
    if ROOT:
        stored = tl.sqrt_rn(value)
    if mask is not None:  # masked lanes hold what the masked loads left: not part of a block
        stored = tl.where(mask, stored, 0.0)
    # The blocks as rows only where their maxima are taken: element-wise work on a 2-D tile made
    # triton 3.6 lay the table's gathers out column-major (no contiguity along either axis) and
    # convert every tile to and from that layout through shared memory; in 1-D the gathers take
    # the vector accesses' layout.
    rows: tl.constexpr = value.shape[0] // _QUANTIZATION_BLOCK
    scales = tl.max(tl.reshape(tl.abs(stored), (rows, _QUANTIZATION_BLOCK)), axis=1)
    safe = tl.where(scales > 0.0, scales, 1.0)
    each = tl.reshape(tl.broadcast_to(safe[:, None], (rows, _QUANTIZATION_BLOCK)), value.shape)
    scaled = stored / each
    # the last entry <= the value (0 below the first), at most 254 so that a next one exists
    lower = tl.zeros(scaled.shape, dtype=tl.int32)
    for halving in tl.static_range(8):
        candidate = lower + (128 >> halving)
        lower = tl.where(tl.load(code_ptr + candidate) <= scaled, candidate, lower)
    lower = tl.minimum(lower, 254)
    low = tl.load(code_ptr + lower)
    gap = tl.load(code_ptr + lower + 1) - low
    above = tl.where(gap > 0.0, (scaled - low) / tl.where(gap > 0.0, gap, 1.0), 0.0)
    if STOCHASTIC:
        up = random_bits(base, offsets).to(tl.float32) / 65536.0 < above
    else:
        up = above >= 0.5
    tl.store(codes_ptr + offsets, (lower + up.to(tl.int32)).to(tl.uint8), mask=mask)
    # The rows' block indices reduced from their offsets, in the layout of the scales (a
    # tl.arange of rows is laid out otherwise); the store still converts both to a layout of its
    # own through shared memory, 4 values a program, and no tile.
    firsts = tl.min(tl.reshape(offsets, (rows, _QUANTIZATION_BLOCK)), axis=1)
    tl.store(scales_ptr + firsts // _QUANTIZATION_BLOCK, scales, mask=firsts < numel)


def code_tables(
    state_dtype: torch.dtype, placeholder: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The code tables (fp32, on the launch's device) of 8-bit states' first and second
    moment; ``placeholder`` twice for other states, which read none."""
    if state_dtype != torch.uint8:
        return placeholder, placeholder
    device = placeholder.device
    return FIRST_MOMENT.table_on(device), SECOND_MOMENT.table_on(device)


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
# Tables of these lists hold data the kernel streams; the other lists (step counters, the
# schedule-free average's scalars) it does not. A launch's states share one dtype.
PARAM_LISTS = ("param", "grad", "compensation")
STATE_LISTS = ("exp_avg", "exp_avg_sq", "z")


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
    """The tables a launch walks, on ``device``: ``{name}_ptrs`` for every list, the element
    counts, the per-program tables, and the alignment the launch may assume.

    ``lists`` maps names to one tensor per parameter (checked by the caller): "param" first, its
    states (``STATE_LISTS``: "exp_avg" and "exp_avg_sq" of AdaWarm, "z" and "exp_avg_sq" of the
    schedule-free step), "grad", "compensation", and scalars ("step", ...). ``pointers`` are
    their data pointers in that order when the caller has them already. ``stream_ids`` numbers
    the tensors' random streams for stochastic rounding. The program layout is built for
    ``block_size``, which the tables carry so that the launch uses the same.
    """
    if pointers is None:
        pointers = tuple(tuple(t.data_ptr() for t in tensors) for tensors in lists.values())
    state = next(name for name in lists if name in STATE_LISTS)
    param_dtype = lists["param"][0].dtype
    param_align, state_align = vector_alignments(param_dtype, lists[state][0].dtype)
    # Every streamed array moves as many elements an access: an 8-bit exp_avg_sq beside an
    # fp32 z (schedule-free) a quarter of z's bytes.
    elements = param_align // torch.empty((), dtype=param_dtype).element_size()
    alignments = {
        name: param_align if name in PARAM_LISTS else elements * lists[name][0].element_size()
        for name in lists
        if name in PARAM_LISTS or name in STATE_LISTS
    }
    # Alignment is checked, never assumed: one pointer off (a view at an odd storage offset)
    # and the whole launch takes the variant without alignment hints.
    aligned = all(
        pointer % alignments[name] == 0
        for name, row in zip(lists, pointers, strict=True)
        if name in alignments
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
