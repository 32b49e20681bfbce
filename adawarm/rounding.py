"""Stochastic rounding of fp32 to bf16 with a counter-based random stream.

The random bits of element ``i`` of tensor ``k`` (its position in the list a backend receives) at
step ``t`` are a hash of ``(seed, k, t, i)``, so a run is reproducible from its seed and the Triton
kernel (``adawarm.kernels.adawarm_step``) draws exactly the same bits: both sides use this hash
(Chris Wellons' "lowbias32" mixer) in 32-bit arithmetic, written with 16-bit halves so that no
intermediate product overflows int64.

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


def stream_base(seed: int, stream: int, step: int) -> int:
    """The per-tensor, per-step key of the random stream."""
    return mix32((seed & MASK32) ^ mix32((_mul32(stream, GOLDEN) + step) & MASK32))


def random_bits(base: int, numel: int, device: torch.device) -> Tensor:
    """16 random bits (int64 in [0, 65536)) for each of ``numel`` elements."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return mix32((base + _mul32(index, GOLDEN)) & MASK32) & 0xFFFF


def stochastic_round_to_bf16(values: Tensor, base: int) -> Tensor:
    """Round fp32 ``values`` to bf16, up or down at random in proportion to the distance."""
    bits = values.contiguous().view(torch.int32).to(torch.int64) & MASK32
    bits = (bits + random_bits(base, values.numel(), values.device).view(values.shape)) & 0xFFFF0000
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    rounded = bits.view(torch.float32)
    return torch.where(torch.isfinite(values), rounded, values).to(torch.bfloat16)
