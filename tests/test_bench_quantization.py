"""``python -m bench quantization``: one 8-bit store's error on a model's moments."""

from __future__ import annotations

import json

import torch

from bench import quantization


def test_a_second_moment_coded_as_itself_loses_its_small_values_and_its_root_does_not():
    # per block, one large second moment and the rest 1e-14 of it: v itself falls below the
    # map's smallest code (1e-7) and is stored as 0, which turns m / (sqrt(v) + eps) into
    # m / eps; its square root (1e-7 of the largest) keeps a code
    exp_avg = torch.full((1024,), 1e-7)
    exp_avg_sq = torch.full((1024,), 1e-14)
    exp_avg_sq[::256] = 1.0
    moments = [(exp_avg, exp_avg_sq)]
    itself = quantization.errors(moments, 1000, 256, quantization.SECOND_MOMENT_ITSELF, None)
    root = quantization.errors(moments, 1000, 256, quantization.SECOND_MOMENT, None)
    assert itself["update"] > 10.0  # 1000 % and more
    assert root["update"] < 0.1


def test_the_command_measures_each_model_block_size_and_rounding(tmp_path, monkeypatch):
    monkeypatch.setattr(quantization, "ARCHITECTURES", ("LSTM",))
    monkeypatch.setattr(quantization, "SNAPSHOTS", (3,))
    monkeypatch.setattr(quantization, "BLOCK_SIZES", (64, 256))
    rows = quantization.main(["--out", str(tmp_path)])
    assert len(rows) == 1 * 1 * 2 * 2 * 2  # models, steps, codes of v, block sizes, roundings
    assert all(
        0.0 < row["update"] < 1.0 for row in rows if row["second moment coded as"] == "sqrt(v)"
    )
    saved = json.loads((tmp_path / "quantization.json").read_text())
    assert saved["rows"] == rows
    text = (tmp_path / "quantization.md").read_text()
    assert "`python -m bench quantization`" in text.splitlines()[0]
    assert "| LSTM | 3 | sqrt(v) |" in text and "block 64: 2.125" in text
