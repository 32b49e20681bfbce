"""The prototype of 8-bit optimizer state (bench.state8bit): what a step leaves in the state,
the methods it trains, and the paired comparison with a saved grid."""

from __future__ import annotations

import json

import pytest
import torch

from adawarm import AdaWarm, AdaWarmScheduleFree
from adawarm.quantization import FIRST_MOMENT, MIN_8BIT_SIZE, SECOND_MOMENT, dequantize, quantize
from adawarm.rounding import EXP_AVG_SQ_ROLE, random_bits, stream_base
from bench import state8bit, training
from bench.grid import DEFAULT_NAME, USER_SCHEDULE, full_grid, methods_for
from bench.peers import EIGHT_BIT_PEERS, Peer
from bench.training import Run


def variant_named(name):
    return next(v for v in state8bit.VARIANTS if v.name == name)


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
    variant = variant_named(
        "AdaWarm default, bf16 params + stochastic rounding + state_dtype=torch.uint8"
    )
    method = state8bit.method_of(variant, full_grid()[0])
    assert method.param_dtype == "bfloat16" and method.compensation == "stochastic"
    assert variant.reference == DEFAULT_NAME and variant.margin == 0.02


@pytest.mark.parametrize("peer", EIGHT_BIT_PEERS, ids=lambda peer: peer.kind)
def test_a_peer_trains_as_the_grids_adamw_with_its_optimizer_in_every_cell(peer):
    variant = variant_named(peer.kind)
    for cell in full_grid():
        reference = next(m for m in methods_for(cell) if m.name == variant.reference_in(cell.name))
        method = state8bit.method_of(variant, cell)
        assert method.kind == peer.kind and method.adamw_like
        settings = method.settings(cell)
        assert settings.pop("kind") == peer.kind
        assert settings == {k: v for k, v in reference.settings(cell).items() if k != "kind"}
        # its own warmup where the cell has no user's warmup, as AdamW has it
        own = round(state8bit.PEER_WARMUP * cell.steps)
        assert settings["warmup_steps"] == (0 if USER_SCHEDULE in cell.name else own)


def test_a_peer_steps_with_its_class_under_adamws_warmup(monkeypatch):
    torch_as_peer = Peer("torch", "torch.optim", "Adam", "8-bit")
    monkeypatch.setitem(training.BY_KIND, "bitsandbytes AdamW8bit", torch_as_peer)
    cell = full_grid()[0]
    method = state8bit.method_of(variant_named("bitsandbytes AdamW8bit"), cell)
    params = [torch.zeros(3, requires_grad=True)]
    optimizer = training.make_optimizer(method, params, 0.1, cell)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["weight_decay"] == training.WEIGHT_DECAY
    factor = training.lr_multiplier(method, cell)
    assert factor(0) == pytest.approx(1 / round(state8bit.PEER_WARMUP * cell.steps))


def test_a_peer_that_does_not_install_is_left_out_or_refused_by_name(monkeypatch, tmp_path):
    missing = Peer("bitsandbytes", "no_such_module_here", "AdamW8bit", "8-bit")
    monkeypatch.setitem(state8bit.BY_KIND, "bitsandbytes AdamW8bit", missing)
    variant = variant_named("bitsandbytes AdamW8bit")
    assert "ModuleNotFoundError" in state8bit.unavailable(variant)
    assert state8bit.unavailable(variant_named(DEFAULT_NAME + ", 8-bit moments")) is None
    with pytest.raises(SystemExit):
        state8bit.main(["--variants", variant.name, "--out", str(tmp_path)])


def test_extra_seeds_train_the_variant_and_its_reference_past_the_grids_seeds(tmp_path):
    pytest.importorskip("tqdm", reason="the bench extra: pip install -e '.[bench]'")
    name = "AdaWarm default, 8-bit moments"
    argv = ["--variants", name, "--only", "LSTM, beta2 0.95", "--lrs", "0.3", "--workers", "1"]
    state8bit.main([*argv, "--extra-seeds", "1", "--out", str(tmp_path / "extra")])
    record = json.loads((tmp_path / "extra" / "state8bit.json").read_text())
    assert {(r["method"], r["lr"], r["seed"]) for r in record["runs"]} == {
        (name, 0.3, 10),
        (DEFAULT_NAME, 0.3, 10),
    }
    state8bit.main([*argv, "--seeds", "1", "--out", str(tmp_path / "first")])
    paths = [str(tmp_path / folder / "state8bit.json") for folder in ("first", "extra")]
    text = state8bit.main(["--report-from", *paths, "--out", str(tmp_path / "both")])
    row = next(line for line in text.splitlines() if "| 0.3 |" in line)
    assert ", 2 seeds |" in row  # seed 0 against the saved grid, seed 10 against its own run
    with pytest.raises(SystemExit):
        state8bit.main([*argv, "--seeds", "1", "--extra-seeds", "1"])


def test_a_peers_run_is_compared_with_the_grids_adamw_and_names_its_version(monkeypatch, tmp_path):
    pytest.importorskip("tqdm", reason="the bench extra: pip install -e '.[bench]'")
    torch_as_peer = Peer("torch", "torch.optim", "Adam", "8-bit")
    for module in (state8bit, training):  # the pool's processes are forked with the patch
        monkeypatch.setitem(module.BY_KIND, "bitsandbytes AdamW8bit", torch_as_peer)
    argv = ["--variants", "bitsandbytes AdamW8bit", "--only", "LSTM, beta2 0.95", "--lrs", "0.3"]
    text = state8bit.main([*argv, "--seeds", "2", "--workers", "1", "--out", str(tmp_path)])
    assert f"Peers: torch {torch.__version__} Adam." in text
    assert "### bitsandbytes AdamW8bit, against AdamW warmup 5% (AdamW in the" in text
    row = next(line for line in text.splitlines() if line.startswith("| LSTM, beta2 0.95"))
    assert ", 2 seeds |" in row  # paired with the saved grid's AdamW runs
