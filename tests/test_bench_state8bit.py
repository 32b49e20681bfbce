"""The prototype of 8-bit optimizer state (bench.state8bit): what a step leaves in the state,
the methods it trains, and the paired comparison with a saved grid."""

from __future__ import annotations

import pytest
import torch

from adawarm import AdaWarm, AdaWarmScheduleFree
from adawarm.quantization import FIRST_MOMENT, MIN_8BIT_SIZE, SECOND_MOMENT, dequantize, quantize
from adawarm.rounding import EXP_AVG_SQ_ROLE, random_bits, stream_base
from bench import state8bit
from bench.grid import DEFAULT_NAME, full_grid, methods_for
from bench.training import Run


def stepped(kind, **options):
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.randn(MIN_8BIT_SIZE + 5, generator=generator).requires_grad_(),
        torch.randn(7, generator=generator).requires_grad_(),  # below the size: full precision
    ]
    optimizer = kind(params, lr=0.01, **options)
    if kind is AdaWarmScheduleFree:
        optimizer.train()
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    return optimizer, params


def test_each_large_tensors_entries_hold_their_8_bit_store_and_small_ones_are_untouched():
    optimizer, (large, small) = stepped(AdaWarm)
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in (large, small)}
    state8bit.store_in_eight_bits(optimizer, ("exp_avg", "exp_avg_sq"), seed=3, step=1)
    for key, code in (("exp_avg", FIRST_MOMENT), ("exp_avg_sq", SECOND_MOMENT)):
        role = state8bit.CODES[key][1]
        bits = random_bits(stream_base(3, 0, 1, role), large.numel(), "cpu")
        expected = dequantize(*quantize(before[large][key], code, bits), code)
        assert torch.equal(optimizer.state[large][key], expected)
        assert not torch.equal(expected, before[large][key])  # it did change
        assert torch.equal(optimizer.state[small][key], before[small][key])


def test_the_schedule_free_form_stores_the_entries_it_names():
    optimizer, (large, _) = stepped(AdaWarmScheduleFree)
    z, exp_avg_sq = (optimizer.state[large][key].clone() for key in ("z", "exp_avg_sq"))
    state8bit.store_in_eight_bits(optimizer, ("exp_avg_sq",), seed=3, step=1)
    assert torch.equal(optimizer.state[large]["z"], z)  # not named: as it was
    bits = random_bits(stream_base(3, 0, 1, EXP_AVG_SQ_ROLE), large.numel(), "cpu")
    expected = dequantize(*quantize(exp_avg_sq, SECOND_MOMENT, bits), SECOND_MOMENT)
    assert torch.equal(optimizer.state[large]["exp_avg_sq"], expected)


def test_a_variant_is_its_reference_method_with_8_bit_entries():
    cell = full_grid()[0]
    variant = state8bit.VARIANTS[0]
    method = state8bit.method_of(variant, cell)
    reference = next(m for m in methods_for(cell) if m.name == DEFAULT_NAME)
    assert method.name == variant.name and method.eight_bit == ("exp_avg", "exp_avg_sq")
    assert not method.is_default
    settings = method.settings(cell)
    assert settings.pop("eight_bit") == ["exp_avg", "exp_avg_sq"]
    assert settings == reference.settings(cell)  # the same training otherwise
    assert "eight_bit" not in reference.settings(cell)  # saved runs keep matching


def test_a_variant_of_the_option_trains_its_reference_with_8_bit_state():
    cell = full_grid()[0]
    variant = next(v for v in state8bit.VARIANTS if v.option)
    method = state8bit.method_of(variant, cell)
    reference = next(m for m in methods_for(cell) if m.name == variant.reference)
    assert method.eight_bit == () and method.state_dtype == "uint8"
    settings = method.settings(cell)
    assert settings.pop("state_dtype") == "uint8"
    assert settings == {k: v for k, v in reference.settings(cell).items() if k != "state_dtype"}


def test_a_variant_is_compared_seed_by_seed_at_its_margin():
    cell = "LSTM, beta2 0.95, 300 steps, cosine"
    variant = state8bit.VARIANTS[0]

    def runs(method, losses):
        return [Run(cell, method, 0.01, s, x, [(1, x)], 0.0) for s, x in enumerate(losses)]

    saved = runs(DEFAULT_NAME, [2.50, 2.60, 2.70])
    mine = runs(variant.name, [2.501, 2.602, 3.5])  # the third seed collapsed
    lines = state8bit.compare(variant, mine, saved, {cell: 3.1})
    row = next(line for line in lines if line.startswith(f"| {cell} |"))
    assert "| 1 / 0 |" in row and "undecided" in row
    assert lines[-1].endswith("(as the quality report counts them): at 1 rates")
    close = runs(variant.name, [2.501, 2.602, 2.699])
    lines = state8bit.compare(variant, close, saved, {cell: 3.1})
    assert "non-inferior 1 (of 1)" in lines[-1]


def test_the_command_trains_each_variant_and_writes_its_report(tmp_path):
    pytest.importorskip("tqdm", reason="the bench extra: pip install -e '.[bench]'")
    text = state8bit.main(
        [
            *("--variants", "AdaWarm default, 8-bit moments", "--only", "LSTM, beta2 0.95"),
            *("--seeds", "1", "--workers", "1", "--out", str(tmp_path)),
        ]
    )
    assert "### AdaWarm default, 8-bit moments, against AdaWarm default (margin 0.01)" in text
    assert (tmp_path / "state8bit.md").read_text() == text + "\n"
    rebuilt = tmp_path / "rebuilt"
    argv = ["--report-from", str(tmp_path / "state8bit.json"), "--out", str(rebuilt)]
    assert state8bit.main(argv) == text  # the report from its JSON
    assert not (rebuilt / "state8bit.json").exists()


def test_bf16_parameters_with_8_bit_moments_train_as_bf16_and_compare_with_fp32():
    variant = state8bit.VARIANTS[-1]
    method = state8bit.method_of(variant, full_grid()[0])
    assert method.param_dtype == "bfloat16" and method.compensation == "stochastic"
    assert variant.reference == DEFAULT_NAME and variant.margin == 0.02
