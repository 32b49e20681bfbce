"""Stochastic rounding of fp32 to bf16 with a counter-based random stream.

The random bits of element ``i`` of tensor ``k`` (its position in the list a backend receives) at
step ``t`` are a hash of ``(seed, k, t, i)`` for the parameter, and of ``(seed, k, t, role, i)`` for
its moments (:data:`EXP_AVG_ROLE`, :data:`EXP_AVG_SQ_ROLE`: each stored tensor draws its own
stream, so the rounding errors of a parameter and its moments are independent). A run is
reproducible from its seed and the Triton
kernel (``adawarm.kernels.adawarm_step``) draws exactly the same bits: both sides use this hash
(Chris Wellons' "lowbias32" mixer) in 32-bit arithmetic: on Python ints and int64 tensors
(:func:`mix32`) with 16-bit halves so that no intermediate product overflows int64, on CPU tensors
and in the kernel in uint32, whose products wrap by definition.

Rounding: add 16 random bits to the fp32 bit pattern and drop the low 16 bits. A value rounds up
with probability equal to its distance from the lower bf16 neighbour over the gap, so the expected
stored value is the fp32 value: updates far below an ulp survive on average.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX1 = 0x7FEB352D
MIX2 = 0x846CA68B
# The streams of a parameter's states: the parameter's key re-hashed with the role. The first
# state is AdaWarm's exp_avg or AdaWarmScheduleFree's z; SWITCH_ROLE rounds a schedule-free
# parameter moved between its train and eval points.
PARAM_ROLE, EXP_AVG_ROLE, EXP_AVG_SQ_ROLE, SWITCH_ROLE = 0, 1, 2, 3


def _mul32(x, constant: int):
    """``x * constant mod 2^32`` for ``0 <= x < 2^32``, with products below 2^48."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x):
    """The lowbias32 integer hash; works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX2)
    return x ^ (x >> 16)


def stream_base(seed: int, stream: int, step: int, role: int = PARAM_ROLE) -> int:
    """The per-tensor, per-step key of the random stream of tensor ``stream``'s parameter
    (``role`` 0) or one of its moments."""
    base = mix32((seed & MASK32) ^ mix32((_mul32(stream, GOLDEN) + step) & MASK32))
    return base if role == PARAM_ROLE else mix32(base ^ role)


def rounds_stochastically(
    dtype: torch.dtype, rounding_seed: int | None, wanted: bool = True
) -> bool:
    """Whether both backends store into ``dtype`` by stochastic rounding: only bf16 and 8-bit
    (uint8, the states' codes), only with a seed (``None`` rounds every store to nearest), and
    only where ``wanted`` (always for the states; for the parameters with
    ``compensation="stochastic"``)."""
    return wanted and rounding_seed is not None and dtype in (torch.bfloat16, torch.uint8)


def _logical_shift_right(x: Tensor, shift: int) -> Tensor:
    """``x >> shift`` for uint32 ``x`` (torch has no uint32 shift on CPU): an arithmetic int32
    shift, its sign-extended bits masked off."""
    return ((x.view(torch.int32) >> shift) & ((1 << (32 - shift)) - 1)).view(torch.uint32)


def _mix32_uint32(x: Tensor) -> Tensor:
    """:func:`mix32` on a uint32 tensor, in place: uint32 products wrap mod 2^32 by definition, so
    this needs no 16-bit halves and moves half the bytes of the int64 form. Stochastic rounding of
    2.5M elements on the 2-core CI machine: 113 ms with int64, 30-42 ms with this."""
    x.bitwise_xor_(_logical_shift_right(x, 16)).mul_(MIX1)
    x.bitwise_xor_(_logical_shift_right(x, 15)).mul_(MIX2)
    return x.bitwise_xor_(_logical_shift_right(x, 16))


def random_bits(base: int, numel: int, device: torch.device) -> Tensor:
    """16 random bits (an integer tensor with values in [0, 65536)) for each of ``numel``
    elements: the low half of ``mix32((base + i * GOLDEN) mod 2^32)`` for element ``i``."""
    keys = torch.arange(base, base + numel * GOLDEN, GOLDEN, dtype=torch.int64, device=device)
    keys &= MASK32
    if keys.is_cpu:  # uint32 arithmetic is faster; not every device has uint32 mul/xor kernels
        return _mix32_uint32(keys.to(torch.uint32)).bitwise_and_(0xFFFF)
    return mix32(keys) & 0xFFFF


def stochastic_round_to_bf16(values: Tensor, base: int) -> Tensor:
    """Round fp32 ``values`` to bf16, up or down at random in proportion to the distance."""
    finite = torch.isfinite(values)
    # int32 arithmetic on the bit patterns: for finite values, adding < 2^16 never overflows
    # (the largest finite magnitude is 0x7F7FFFFF); non-finite values are zeroed first and
    # restored after.
    bits = torch.where(finite, values, 0.0).contiguous().view(torch.int32)
    noise = random_bits(base, values.numel(), values.device).to(torch.int32)
    rounded = (bits + noise.view(values.shape)).bitwise_and_(-(1 << 16)).view(torch.float32)
    return torch.where(finite, rounded, values).to(torch.bfloat16)
