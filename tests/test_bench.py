"""The benchmark harnesses: byte counts, the comparison's bookkeeping, and tiny end-to-end runs."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bench import RUNS, collapse, gpt2, schedule, speed, tune
from bench.__main__ import SUBCOMMANDS
from bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parent.parent


def test_bytes_per_parameter_match_the_reference_counts():
    assert speed.bytes_per_param(torch.float32, torch.float32) == 28
    assert speed.bytes_per_param(torch.bfloat16, torch.float32) == 22
    assert speed.bytes_per_param(torch.bfloat16, torch.bfloat16) == 14


def test_gpt2_small_has_124m_parameters():
    total = sum(torch.Size(s).numel() for s in speed.gpt2_small_shapes())
    assert total == 124_439_808


def test_speed_run_on_a_tiny_case_measures_every_optimizer():
    case = speed.Case("tiny", ((1000,), (7, 3)))
    rows = speed.run(torch.device("cpu"), [case], [1], steps=2)
    assert [r.optimizer for r in rows] == list(speed.optimizers(torch.device("cpu")))
    for row in rows:
        assert row.median_ms > 0 and math.isfinite(row.gb_per_s)
        assert row.bytes_per_param == 28
    assert "AdaWarm torch backend" in speed.format_table(rows)


def test_small_cases_are_timed_in_interleaved_rounds_against_the_optimizer_each_replaces():
    case = speed.Case(
        "tiny model",
        ((3, 5), (3,)),
        small=True,
        model=lambda: torch.nn.Linear(5, 3),
        batch_shape=(2, 5),
    )
    rows = speed.run(torch.device("cpu"), [case], [1, 2], steps=2)  # one thread only
    by_name = {r.optimizer: r for r in rows}
    assert list(by_name) == list(speed.optimizers(torch.device("cpu")))
    assert {r.threads for r in rows} == {1}
    assert by_name["AdaWarm torch backend"].reference == "torch AdamW fused"
    assert (
        by_name["AdaWarmScheduleFree torch backend"].reference
        == "schedulefree AdamWScheduleFree foreach"
    )
    median, low, high = by_name["AdaWarm torch backend"].paired_ratio
    assert 0 < low <= median <= high
    assert by_name["torch AdamW fused"].paired_ratio is None
    # and in a training loop, where the model's forward and backward run before each step
    median, low, high = by_name["AdaWarmScheduleFree torch backend"].loop_ratio
    assert 0 < low <= median <= high
    assert all(row.loop_us > 0 for row in rows)
    assert by_name["torch AdamW fused"].loop_ratio is None
    report = speed.markdown_report(rows)
    assert "Small models" in report and "| tiny model | AdaWarm torch backend |" in report
    assert "| in a training loop: us |" in report


def test_the_small_models_have_the_parameter_shapes_of_their_cases():
    for case in speed.SMALL_CPU_CASES:
        if case.model is not None:
            assert tuple(tuple(p.shape) for p in case.model().parameters()) == case.shapes
            case.model()(torch.zeros(case.batch_shape))  # a batch it takes


def test_tune_run_measures_every_launch_configuration():
    # On CPU the kernel runs under Triton's interpreter (tests/conftest.py): the harness only.
    configs = [(128, 2), (1024, 4)]
    rows = tune.run(torch.device("cpu"), tune.QUICK_CASES, configs, steps=1)
    assert [(r.block_size, r.num_warps) for r in rows] == configs
    for row in rows:
        assert row.median_ms > 0 and math.isfinite(row.gb_per_s) and row.percent_of_copy > 0
    assert tune.best_overall(rows) in configs
    assert "best overall" in tune.format_table(rows)


def test_schedule_curves_start_with_the_default_and_ramp_only_is_the_untuned_warmup():
    curves = schedule.curves(0.98, "untuned", 150)
    assert next(iter(curves)) == "AdaWarm default"
    assert curves["AdaWarm default"][:51] == [min(1.0, t / 50) for t in range(1, 52)]
    ramp = curves["AdaWarm ramp, warmup_steps='untuned'"]
    assert ramp == curves["untuned linear, min(1, t (1 - beta2) / 2)"]
    product = curves["AdaWarm ramp x rectify, warmup_steps='untuned'"]
    assert all(
        p <= r for p, r in zip(product, curves["AdaWarm rectify only (r_t, RAdam)"], strict=True)
    )


@pytest.mark.parametrize(("text", "value"), [("auto", "auto"), ("untuned", "untuned"), ("7", 7)])
def test_schedule_takes_every_form_of_warmup_steps(text, value):
    assert schedule.warmup_steps_argument(text) == value
    assert schedule.curves(0.999, value, 60)


@pytest.mark.parametrize("text", ["tuned", "-3", "2.5", "measured"])
def test_schedule_refuses_what_the_optimizer_refuses_and_what_it_cannot_draw(text):
    with pytest.raises(argparse.ArgumentTypeError, match="Invalid warmup_steps"):
        schedule.warmup_steps_argument(text)


def test_cli_dispatches_sub_commands_and_refuses_unknown_ones(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra: pip install -e '.[bench]'")
    from bench.__main__ import main

    main(["schedule", "--beta2", "0.99", "--out", str(tmp_path)])
    assert (tmp_path / "schedule.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["bogus"])


def test_collapse_counts_adamw_and_adawarm_at_each_warmup_length(tmp_path):
    pytest.importorskip("tqdm", reason="the bench extra: pip install -e '.[bench]'")
    argv = ["--beta2", "0.95", "--steps", "6", "--warmups", "2", "3", "--seeds", "2"]
    text = collapse.main([*argv, "--lr", "10", "--workers", "1", "--out", str(tmp_path)])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 0.95 |")]
    assert [row[1] for row in rows] == ["2", "3"]
    # at lr 10 every run collapses: equal counts, nothing to tell apart
    assert all(len(row) == 5 and row[-1] == "1.00 |" for row in rows)
    saved = json.loads((tmp_path / "collapse.json").read_text())
    methods = {(run["method"], run["seed"]) for run in saved["runs"]}
    assert methods == {
        (f"{name} W={w}", s) for name in ("AdamW", "AdaWarm") for w in (2, 3) for s in (0, 1)
    }
    assert (tmp_path / "collapse.md").read_text() == text + "\n"


def test_low_precision_speed_rows_count_state_and_moved_bytes():
    assert speed.bytes_per_param(torch.bfloat16, torch.bfloat16, torch.bfloat16) == 18
    case = speed.Case("tiny bf16", ((1000,),), torch.bfloat16, low_precision=True)
    rows = {r.optimizer: r for r in speed.run(torch.device("cpu"), [case], [1], steps=2)}
    assert rows["torch AdamW fused"].state_bytes_per_param == 4  # bf16 moments
    assert rows["AdaWarm torch, fp32 moments"].state_bytes_per_param == 8
    assert rows["AdaWarm torch, bf16 moments"].bytes_per_param == 14
    kahan = rows["AdaWarm torch, bf16 moments + Kahan"]
    assert (kahan.state_bytes_per_param, kahan.bytes_per_param) == (6, 18)


@pytest.mark.parametrize("subcommand", [*sorted(SUBCOMMANDS), None])
def test_every_run_writes_under_the_runs_folder_unless_told_otherwise(
    subcommand, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps help text to the terminal's width
    with pytest.raises(SystemExit):
        bench_main([subcommand, "--help"] if subcommand else ["--help"])
    assert f"(default: {RUNS}" in capsys.readouterr().out


def test_the_runs_folder_is_ignored_by_git_and_the_committed_results_are_not():
    def ignored(path: Path) -> bool:
        check = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
        assert check.returncode in (0, 1), "not a git checkout"
        return check.returncode == 0

    assert ignored(RUNS / "quality.json")
    assert not ignored(ROOT / "bench" / "results" / "quality.json")


def test_the_end_to_end_model_has_gpt2_small_shapes():
    with torch.device("meta"):
        model = gpt2.GPT(gpt2.GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    # torch's Linear stores (out, in), GPT-2's Conv1D (in, out): compare shapes as sets of sizes.
    ours = sorted(tuple(sorted(p.shape)) for p in model.parameters())
    assert ours == sorted(tuple(sorted(shape)) for shape in speed.gpt2_small_shapes())


def test_the_end_to_end_step_is_timed_for_both_optimizers():
    config = gpt2.GPTConfig(vocab=64, context=16, width=32, layers=1, heads=2)
    rows = gpt2.measure(config, batch=2, device=torch.device("cpu"), steps=2, graph=False)
    assert [row.optimizer for row in rows] == ["torch AdamW fused", "AdaWarm"]
    assert all(row.tokens_per_s > 0 and row.spread_ms[0] <= row.spread_ms[1] for row in rows)


def test_the_committed_cpu_speed_report_rebuilds_from_its_json(tmp_path):
    saved = ROOT / "bench" / "results" / "speed-cpu.json"
    rows = speed.main(["--report-from", str(saved), "--out", str(tmp_path)])
    assert len(rows) == len(json.loads(saved.read_text()))
    rebuilt = (tmp_path / "speed-cpu.md").read_text()
    assert rebuilt == (ROOT / "bench" / "results" / "speed-cpu.md").read_text()
    # a row per measurement, and the header lines of each table (large cases, small models)
    tables = 1 + any(row.paired_ratio for row in rows)
    assert rebuilt.count("\n| ") == len(rows) + 2 * tables
