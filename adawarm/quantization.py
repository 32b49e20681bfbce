"""Block-wise 8-bit moments: the code maps, and quantizing to them by stochastic rounding.

A moment tensor is stored as one byte per element and one fp32 scale per block of
``block_size`` consecutive elements (of the flattened tensor, from its first element: a block
never straddles two tensors). An element's byte indexes a sorted table of 256 values in
[-1, 1] (a *code map*), its value is the table's entry times its block's scale, and the scale
is the block's largest magnitude, so that every block uses the whole table and the largest
element of each block is stored exactly.

The maps are *dynamic*, as bitsandbytes' (Dettmers et al. 2022, *8-bit optimizers via
block-wise quantization*): a magnitude's bits are a run of ``n`` zeros, a one, and ``F``
fraction bits, for ``10^-n (0.1 + 0.9 (j + 1) / 2^F)`` -- a decade per leading zero, and
fewer levels in each smaller decade (64 in (0.1, 1] for the signed map, 32 in (0.01, 0.1],
... down to 1e-6). Moments spread over decades within a block, and most of a block's
elements lie within a decade or two of its largest, where the map is finest. The second
moment is stored as its square root, on the unsigned map (128 levels in (0.1, 1], down to
1e-7): the update divides by ``sqrt(v)``, so its error enters there once, and ``sqrt(v)``
spans half the decades of ``v`` -- a ``v`` 1e-14 below its block's largest still has a code
above zero, where a zero would turn ``m / (sqrt(v) + eps)`` into ``m / eps`` (the "zero point"
problem Li et al. 2023, *Memory efficient optimizers with 4-bit states*, describe).

Stores round stochastically between the two neighbouring codes, up with probability equal to
the distance from the lower one over the gap (16 random bits of the counter-based stream of
``adawarm.rounding``), so the stored value is unbiased -- for the second moment, its square root
-- and updates far below a code's gap survive on average, as with the bf16 moments. Without
random bits a store rounds to the nearest code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adawarm import rounding

# Elements per scale. On the grid's models (python -m bench quantization, bench/results/
# quantization.md) one store errs in the update by 1.9-2.6 % at 256 and 1.4-2.0 % at 64 (to the
# nearest code), while the scales cost 4/256 and 4/64 bytes a moment: 256 keeps bf16 parameters
# with both moments at 4.03 bytes a parameter, under 4.1 (64: 4.125). bitsandbytes' and
# torchao's 8-bit optimizers use 256 too.
QUANTIZATION_BLOCK = 256
# The dtype of 8-bit states (their codes), as ``state_dtype`` names it.
EIGHT_BIT = torch.uint8
# Tensors with fewer elements keep full-precision moments (bitsandbytes' min_8bit_size): their
# scales and codes would save little, and small tensors (biases, norms) are the noisiest.
MIN_8BIT_SIZE = 4096


def dynamic_magnitudes(bits: int) -> list[float]:
    """The positive levels of a dynamic map with ``bits`` magnitude bits, ascending: for ``n``
    leading zeros (0 to ``bits - 1``) and ``F = bits - 1 - n`` fraction bits,
    ``10^-n (0.1 + 0.9 (j + 1) / 2^F)`` for ``j < 2^F``; ``2^bits - 1`` levels, the largest 1."""
    levels = []
    for zeros in range(bits):
        fractions = 2 ** (bits - 1 - zeros)
        levels += [10.0**-zeros * (0.1 + 0.9 * (j + 1) / fractions) for j in range(fractions)]
    return sorted(levels)


@dataclass(frozen=True)
class Code:
    """An 8-bit code: ``table`` (256 sorted fp32 values; the byte is an index into it), whether
    it holds the square root of what it stores (``root``), and its name for error messages."""

    name: str
    table: tuple[float, ...]
    root: bool

    def table_on(self, device: torch.device | str) -> Tensor:
        return _table(self.table, torch.device(device))


@functools.cache
def _table(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


_SIGNED = dynamic_magnitudes(7)  # 127 levels: a sign bit and 7 bits of magnitude
# The signed map: -1 ... -1e-6, 0 twice (a sign with no magnitude), 1e-6 ... 1.
FIRST_MOMENT = Code(
    "signed dynamic", tuple([-m for m in reversed(_SIGNED)] + [0.0, 0.0] + _SIGNED), False
)
# The unsigned map of the second moment's square root: 0, 1e-7 ... 1.
SECOND_MOMENT = Code("unsigned dynamic of the square root", (0.0, *dynamic_magnitudes(8)), True)


def block_count(numel: int, block_size: int = QUANTIZATION_BLOCK) -> int:
    """The scales of a tensor of ``numel`` elements."""
    return -(-numel // block_size)


def in_blocks(values: Tensor, block_size: int = QUANTIZATION_BLOCK) -> Tensor:
    """The flattened ``values`` in rows of ``block_size``, the last padded with zeros."""
    flat = values.reshape(-1)
    padding = -flat.numel() % block_size
    return torch.nn.functional.pad(flat, (0, padding)).view(-1, block_size)


def quantize(
    values: Tensor,
    code: Code,
    random_bits: Tensor | None = None,
    block_size: int = QUANTIZATION_BLOCK,
) -> tuple[Tensor, Tensor]:
    """``values`` (fp32; non-negative for a ``root`` code) as (uint8 codes of their shape, fp32
    scales, one per block). ``random_bits``: 16 bits per element (``adawarm.rounding
    .random_bits``) for stochastic rounding; None rounds to the nearest code."""
    stored = values.sqrt() if code.root else values
    blocks = in_blocks(stored, block_size)
    scales = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)
    table = code.table_on(values.device)
    # the neighbouring codes: the largest entry <= the value, and the next (clamped at 1)
    lower = (torch.searchsorted(table, scaled.contiguous(), right=True) - 1).clamp(0, 254)
    low, high = table[lower], table[lower + 1]
    gap = high - low
    above = torch.where(gap > 0, (scaled - low) / torch.where(gap > 0, gap, 1.0), 0.0)
    if random_bits is None:
        up = above >= 0.5
    else:
        uniform = in_blocks(random_bits.to(torch.float32), block_size) / 65536.0
        up = uniform < above
    codes = (lower + up.to(lower.dtype)).to(torch.uint8)
    return codes.reshape(-1)[: values.numel()].view(values.shape), scales


def dequantize(
    codes: Tensor, scales: Tensor, code: Code, block_size: int = QUANTIZATION_BLOCK
) -> Tensor:
    """The fp32 values of ``codes`` and their blocks' ``scales``."""
    table = code.table_on(codes.device)
    blocks = in_blocks(codes, block_size).long()
    values = (table[blocks] * scales.unsqueeze(1)).reshape(-1)[: codes.numel()]
    values = values.view(codes.shape)
    return values.square() if code.root else values


# The codes of a step's two states, in the backends' order: the first (AdaWarm's exp_avg,
# signed) and the second (exp_avg_sq, as its square root).
STATE_CODES = (FIRST_MOMENT, SECOND_MOMENT)


def scales_key(key: str) -> str:
    """The state entry that holds the block scales of the 8-bit state entry ``key``."""
    return f"{key}_scales"


def store_quantized(
    codes: Sequence[Tensor],
    scales: Sequence[Tensor],
    values: Sequence[Tensor],
    code: Code,
    *,
    positions: Sequence[int],
    seed: int | None,
    step: int,
    role: int,
) -> None:
    """Store fp32 ``values`` into 8-bit states (``codes`` and their ``scales``, in place), by
    stochastic rounding from the stream keyed by ``(seed, k, step, role)`` for tensor ``k`` of
    the backend's lists (``positions``), as the bf16 states draw theirs; ``seed=None`` rounds
    to the nearest code."""
    for target, target_scales, new, position in zip(codes, scales, values, positions, strict=True):
        bits = None
        if seed is not None:
            base = rounding.stream_base(seed, position, step, role)
            bits = rounding.random_bits(base, new.numel(), new.device)
        new_codes, new_scales = quantize(new, code, bits)
        target.copy_(new_codes)
        target_scales.copy_(new_scales)
