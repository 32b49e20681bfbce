"""``python -m bench memory``: bytes per parameter counted from the tensors held."""

from __future__ import annotations

import json

import pytest
import torch

from bench import memory

# one tensor of 8-bit moments (17 blocks, the last of one element) and one small one (fp32)
SHAPES = ((4097,), (10,))


@pytest.fixture
def small_model(monkeypatch):
    monkeypatch.setattr(memory, "SHAPES", SHAPES)


def test_each_storage_choice_is_counted_from_its_tensors(small_model):
    rows, _ = memory.measure()
    by_choice = {(r.optimizer, r.params, r.compensation, r.state): r.bytes_per_param for r in rows}
    assert len(by_choice) == len(rows) == 2 * 6 * 3 + 1  # both optimizers, and AdamW
    # counted by hand: 4107 parameters; the large tensor's moments are 4097 codes and 17
    # scales each, the small one's fp32; each tensor's fp32 step counter (4 bytes), and
    # schedule-free's fp64 weight_sum and lr_max (8 each)
    n, steps, averages = 4107, 2 * 4, 2 * 16
    eight_bit_moments = 2 * (4097 + 4 * 17) + 2 * 4 * 10
    expected = {
        ("AdaWarm", "bf16", "stochastic", "8-bit"): 2 * n + eight_bit_moments + steps,
        ("AdaWarm", "fp32", "None", "fp32"): 12 * n + steps,
        ("AdaWarm", "bf16", "kahan", "bf16"): 8 * n + steps,  # parameter, buffer, 2 moments
        # z stays fp32 beside an 8-bit exp_avg_sq
        ("AdaWarmScheduleFree", "bf16", "None", "8-bit"): (
            2 * n + 4 * n + (4097 + 4 * 17) + 4 * 10 + steps + averages
        ),
        ("torch.optim.AdamW", "fp32", "None", "fp32"): 12 * n + steps,
    }
    for choice, held in expected.items():
        assert by_choice[choice] == pytest.approx(held / n, rel=1e-12), choice


def test_a_storage_that_tensors_share_counts_once():
    table = torch.zeros(256)
    state = {"step": torch.zeros(()), "qmap1": table, "qmap2": table}
    held = {}
    for tensor in memory.state_tensors(state):
        held.update(memory.storages(tensor))
    assert sum(held.values()) == 4 + 256 * 4


def test_the_command_writes_its_table_and_the_goal(small_model, tmp_path):
    memory.main(["--out", str(tmp_path)])
    text = (tmp_path / "memory.md").read_text()
    assert text.count("| AdaWarm |") == 18 and "| torch.optim.AdamW |" in text
    assert "bytes a parameter, which meets the goal of 4.1" in text
    assert len(json.loads((tmp_path / "memory.json").read_text())["rows"]) >= 37
