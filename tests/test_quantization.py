"""Block-wise 8-bit moments (adawarm.quantization): the code maps, stores to the nearest code
and by stochastic rounding, and blocks on odd sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adawarm import adawarm
from adawarm.quantization import (
    FIRST_MOMENT,
    QUANTIZATION_BLOCK,
    SECOND_MOMENT,
    block_count,
    dequantize,
    dynamic_magnitudes,
    quantize,
)
from adawarm.rounding import EXP_AVG_ROLE, EXP_AVG_SQ_ROLE, random_bits, stream_base

CODES = [FIRST_MOMENT, SECOND_MOMENT]
# Sizes around the block: none, one, a block less one and more one, several with a tail.
SIZES = [0, 1, QUANTIZATION_BLOCK - 1, QUANTIZATION_BLOCK + 1, 4 * QUANTIZATION_BLOCK + 3]


def moments(code, numel: int, seed: int) -> torch.Tensor:
    """Values spread over decades, as moments are: signed for the first, squares for the
    second."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator) * 10.0 ** torch.randint(
        -4, 1, (numel,), generator=generator
    )
    return values.square() if code.root else values


def test_the_maps_are_256_sorted_codes_with_a_decade_per_leading_zero():
    signed, unsigned = FIRST_MOMENT.table, SECOND_MOMENT.table
    assert len(signed) == len(unsigned) == 256
    assert list(signed) == sorted(signed) and list(unsigned) == sorted(unsigned)
    assert signed[0] == -1.0 and signed[-1] == 1.0 and signed[127] == signed[128] == 0.0
    assert [-x for x in signed[:127]] == list(reversed(signed[129:]))  # symmetric
    assert unsigned[0] == 0.0 and unsigned[-1] == 1.0
    assert min(x for x in signed if x > 0) == pytest.approx(1e-6)
    assert unsigned[1] == pytest.approx(1e-7)
    # 64 levels in (0.1, 1] for a sign bit and 7 of magnitude, half as many each decade below
    magnitudes = dynamic_magnitudes(7)
    per_decade = [sum(10.0 ** -(n + 1) < m <= 10.0**-n for m in magnitudes) for n in range(7)]
    assert per_decade == [64, 32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
@pytest.mark.parametrize("numel", SIZES)
def test_each_block_is_scaled_by_its_largest_which_is_stored_exactly(code, numel):
    values = moments(code, numel, 1)
    codes, scales = quantize(values, code)
    assert codes.dtype == torch.uint8 and codes.shape == values.shape
    assert scales.dtype == torch.float32 and scales.shape == (block_count(numel),)
    stored = values.sqrt() if code.root else values
    for index, scale in enumerate(scales.tolist()):
        block = stored[index * QUANTIZATION_BLOCK : (index + 1) * QUANTIZATION_BLOCK]
        assert scale == float(block.abs().max())
    restored = dequantize(codes, scales, code)
    assert restored.shape == values.shape and restored.dtype == torch.float32
    if numel:
        largest = values.abs().argmax()
        assert restored[largest] == pytest.approx(float(values[largest]), rel=1e-6)


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_a_value_of_the_map_comes_back_as_it_went(code):
    table = code.table_on("cpu")
    values = (table * 3.5).repeat(3)  # scale 3.5 in every block
    if code.root:
        values = values.square()
    codes, scales = quantize(values, code)
    assert torch.equal(scales, torch.full_like(scales, 3.5))
    restored = dequantize(codes, scales, code)
    torch.testing.assert_close(restored, values, rtol=1e-6, atol=0)


@settings(deadline=None, max_examples=30)
@given(
    numel=st.integers(min_value=1, max_value=3 * QUANTIZATION_BLOCK),
    seed=st.integers(min_value=0, max_value=2**16),
    root=st.booleans(),
)
def test_nearest_rounding_errs_by_at_most_half_the_gap_between_neighbouring_codes(
    numel, seed, root
):
    code = SECOND_MOMENT if root else FIRST_MOMENT
    values = moments(code, numel, seed)
    codes, scales = quantize(values, code)
    stored = values.sqrt() if root else values
    restored = dequantize(codes, scales, code)
    restored = restored.sqrt() if root else restored
    table = code.table_on("cpu")
    scale = scales.repeat_interleave(QUANTIZATION_BLOCK)[:numel]
    scaled = stored / torch.where(scale > 0, scale, 1.0)
    index = (torch.searchsorted(table, scaled, right=True) - 1).clamp(0, 254)
    half_gap = (table[index + 1] - table[index]) / 2 * scale
    assert bool(((restored - stored).abs() <= half_gap * (1 + 1e-6) + 1e-30).all())


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_stochastic_rounding_is_unbiased(code):
    # one value between two codes of every decade, 4000 draws: the mean of what is stored
    # is the value (for the second moment, its square root), within the draws' noise
    values = moments(code, QUANTIZATION_BLOCK, 2)
    values[0] = 1.0 if code.root else -1.0  # the block's scale
    draws = 4000
    stored = torch.stack(
        [
            dequantize(*quantize(values, code, random_bits(base, values.numel(), "cpu")), code)
            for base in range(0, draws * 7919, 7919)
        ]
    )
    if code.root:
        stored, values = stored.sqrt(), values.sqrt()
    table = code.table_on("cpu")
    index = (torch.searchsorted(table, values, right=True) - 1).clamp(0, 254)
    gap = table[index + 1] - table[index]
    # a draw errs by at most the gap: the mean's standard error is at most gap / 2 / sqrt(draws)
    error = (stored.mean(0) - values).abs()
    assert bool((error <= 5 * gap / 2 / draws**0.5 + 1e-12).all())
    nearest = dequantize(*quantize(values.square() if code.root else values, code), code)
    nearest = nearest.sqrt() if code.root else nearest
    assert (nearest - values).abs().mean() > 3 * error.mean()  # nearest is biased; this is not


def test_a_block_of_zeros_stays_zero_and_a_tiny_second_moment_keeps_a_code():
    values = torch.zeros(2 * QUANTIZATION_BLOCK)
    values[QUANTIZATION_BLOCK] = 1.0
    values[QUANTIZATION_BLOCK + 1] = 1e-12  # a square root of 1e-6: above the map's 1e-7
    for code in CODES:
        codes, scales = quantize(values, code)
        restored = dequantize(codes, scales, code)
        assert not restored[:QUANTIZATION_BLOCK].any() and scales[0] == 0.0
    codes, scales = quantize(values, SECOND_MOMENT)
    assert dequantize(codes, scales, SECOND_MOMENT)[QUANTIZATION_BLOCK + 1] > 0.0


def creeping_travel(rounding: str | None) -> tuple[float, float]:
    """How far a parameter moves in 200 steps of the functional step whose moments go through
    an 8-bit store after each step (``rounding``: "stochastic", "nearest", or None for none),
    and its mean second moment then. At step 10000 (bias corrections ~1) the second moments,
    0.25-1 across each block, meet gradients of 2: each grows by (1 - beta2)(4 - v) a step,
    below half the gap between its neighbouring codes, as the bf16 moments' creeping moment
    (tests/test_low_precision.py) does below half a bf16 ulp."""
    numel = 4 * QUANTIZATION_BLOCK
    param = torch.zeros(numel)
    exp_avg, exp_avg_sq = torch.full((numel,), 2.0), torch.linspace(0.25, 1.0, numel)
    step = torch.tensor(10_000.0)
    for index in range(200):
        adawarm(
            [param], [torch.full((numel,), 2.0)], [exp_avg], [exp_avg_sq], [step], lr=1e-3,
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, rectify=False,
            backend="torch",
        )  # fmt: skip
        if rounding is None:
            continue
        for values, code, role in (
            (exp_avg, FIRST_MOMENT, EXP_AVG_ROLE),
            (exp_avg_sq, SECOND_MOMENT, EXP_AVG_SQ_ROLE),
        ):
            base = stream_base(0, 0, index + 1, role)
            bits = random_bits(base, numel, "cpu") if rounding == "stochastic" else None
            values.copy_(dequantize(*quantize(values, code, bits), code))
    return float(-param.mean()), float(exp_avg_sq.mean())


def test_a_creeping_second_moment_keeps_creeping_through_stochastic_8_bit_stores():
    travel, second = creeping_travel(None)
    assert 0.4 < travel < 0.45 and 1.2 < second < 1.3
    stochastic = creeping_travel("stochastic")
    assert stochastic[0] == pytest.approx(travel, rel=0.005)  # within 0.03 % here
    assert stochastic[1] == pytest.approx(second, rel=0.002)
    nearest = creeping_travel("nearest")
    assert nearest[1] < 0.95 * second  # stalled: 8 % short, and the steps 3 % too long
    assert nearest[0] > 1.02 * travel
