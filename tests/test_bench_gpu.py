"""``python -m bench gpu``: the rehearsal of every stage, the budget, failures, and the targets."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import gpu_image
import pytest

from bench import gpu, gpu_report, gpu_stages, speed

ROOT = Path(__file__).resolve().parent.parent
STAGE_NAMES = [stage.name for stage in gpu.STAGES]


def test_without_cuda_it_exits_with_one_line_naming_cuda_and_the_rehearsal():
    # No visible CUDA device, on any machine: what a CPU-only user meets.
    result = subprocess.run(
        [sys.executable, "-m", "bench", "gpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert "needs a CUDA device" in result.stderr and "--rehearse" in result.stderr


def test_the_rehearsal_runs_every_stage_with_only_the_gpu_images_packages(tmp_path):
    python = gpu_image.python(tmp_path / "venv")
    # The image's environment lacks what the image lacks (in CI at least the test extra's ruff).
    hidden = gpu_image.hidden_module()
    if hidden is not None:
        assert importlib.util.find_spec(hidden) is not None
        lacking = subprocess.run([python, "-c", f"import {hidden}"], capture_output=True, text=True)
        assert f"No module named '{hidden}'" in lacking.stderr
    command = [python, "-m", "bench", "gpu", "--rehearse", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    folder = tmp_path / "gpu-rehearsal"
    report = json.loads((folder / "report.json").read_text())
    stages = {stage["name"]: stage for stage in report["stages"]}
    assert list(stages) == STAGE_NAMES
    assert {name: stage["status"] for name, stage in stages.items()} == dict.fromkeys(
        STAGE_NAMES, "ok"
    ), (folder / "stages.log").read_text()[-4000:]
    assert report["rehearsal"] and {"gpu", "torch", "triton"} <= set(report["environment"])

    smoke = stages["smoke"]["result"]["tests"]
    assert len(smoke) >= 4 and all(test["outcome"] == "PASSED" for test in smoke)
    assert any("captured_capturable" in test["test"] for test in smoke)
    assert stages["tests"]["result"]["tests"]
    rows = stages["speed"]["result"]["rows"]
    # (b) and (c) time the schedule-free step too, (a) and (b) the measured warmup, (a) 8-bit
    # moments; schedulefree is not on the GPU image
    assert [row["case"][:3] for row in rows] == [
        "(a)", "(a)", "(a)", "(a)", "(b)", "(b)", "(b)", "(b)", "(d)", "(d)", "(c)", "(c)", "(c)",
        "(e)", "(e)",
    ]  # fmt: skip
    assert {row["optimizer"] for row in rows} == {
        *gpu_stages.HEADLINE_OPTIMIZERS,
        "AdaWarmScheduleFree",
        "AdaWarm, measured warmup",
        "AdaWarm, 8-bit moments",
    }
    assert all(row["host_us"] > 0 for row in rows)
    training = stages["training"]["result"]["rows"]
    assert [(row["optimizer"], row["graph"]) for row in training] == [
        ("torch AdamW fused", False),
        ("AdaWarm", False),
        ("torch AdamW fused", True),
        ("AdaWarm", True),
    ]
    assert len(stages["tune"]["result"]["rows"]) == 2
    # Every target has its figure, and none is judged from a CPU's.
    assert len(report["targets"]) == 15
    measured = [t for t in report["targets"] if t["measured"] != "not measured"]
    assert [t["target"] for t in report["targets"] if t not in measured] == [
        "one launch per step per dtype group (each case is one group)",  # counted on a GPU only
        *(  # schedulefree is not installed there
            f"AdaWarmScheduleFree >= 3x faster than schedulefree's foreach step: {case}"
            for case in (rows[4]["case"], rows[10]["case"])
        ),
    ]
    assert all(target["met"] is None for target in report["targets"])

    text = (folder / "report.md").read_text()
    headings = ["# GPU report, rehearsed on the CPU", "## Stages", "## Targets"]
    headings += [f"## {n}. {stage.title}" for n, stage in enumerate(gpu.STAGES, 1)]
    assert all(f"\n{heading}\n" in f"\n{text}" for heading in headings), text
    assert text in result.stdout


def fake_stage(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def speed_row(case: str, optimizer: str, **values) -> dict:
    fields = {
        "case": case,
        "optimizer": optimizer,
        "device": "test",
        "threads": None,
        "params": 1,
        "bytes_per_param": 28,
        "state_bytes_per_param": 8,
        "median_ms": 1.0,
        "quartiles_ms": (0.9, 1.1),
        "gb_per_s": 3000.0,
        "percent_of_copy": 95.0,
        "launches_per_step": 1,
        "host_us": 20.0,
        "torch_version": "test",
        "triton_version": None,
        "date": "test",
    }
    return json.loads(json.dumps(asdict(speed.Row(**(fields | values)))))  # as a report holds it


def test_a_failing_stage_is_recorded_a_slow_one_stopped_with_its_rows_and_the_rest_not_run(
    tmp_path, monkeypatch
):
    out = tmp_path / "gpu-rehearsal"
    row = speed_row("(a) one fp32 tensor", "AdaWarm")
    commands = {
        "smoke": "raise ValueError('boom')",
        # Writes a row, then outlasts its share of the budget.
        "speed": "import json, sys, time\n"
        f"open(sys.argv[1], 'w').write(json.dumps({{'copy_gb_per_s': 1.0, 'rows': [{row!r}]}}))\n"
        "time.sleep(60)",
        # What the report said while this stage ran: the stages before it, already recorded.
        "training": "import json, sys\n"
        f"report = json.loads(open({str(out / 'report.json')!r}).read())\n"
        "seen = [stage['status'] for stage in report['stages']]\n"
        "open(sys.argv[1], 'w').write(json.dumps({'seen': seen}))",
    }
    monkeypatch.setattr(
        gpu,
        "stage_command",
        lambda stage, args, result: [*fake_stage(commands[stage.name]), str(result)],
    )
    monkeypatch.setattr(
        gpu,
        "STAGES",
        (
            gpu.Stage("smoke", "Smoke", 0.25, 0.5),
            gpu.Stage("speed", "Speed", 0.25, 0.5),
            gpu.Stage("training", "Training", 0.25, 0.5),
            gpu.Stage("tests", "Tests", 0.25, 100),
        ),
    )
    with pytest.raises(SystemExit) as exit_status:
        gpu.main(["--rehearse", "--out", str(tmp_path), "--budget", "6"])
    assert exit_status.value.code == 1
    report = json.loads((out / "report.json").read_text())
    smoke, speed_stage, training, tests = report["stages"]
    assert smoke["status"] == "failed" and "ValueError: boom" in smoke["output_tail"]
    assert speed_stage["status"] == "stopped" and speed_stage["result"]["rows"] == [row]
    assert 1.0 <= speed_stage["seconds"] < 5
    assert training["status"] == "ok" and training["result"] == {"seen": ["failed", "stopped"]}
    assert tests["status"] == "not run" and "it needs 100 s" in tests["outcome"]
    assert report["seconds"] < 6
    assert report["targets"][0]["measured"] == "95.0 % (3000 GB/s)"
    text = (out / "report.md").read_text()
    assert "ValueError: boom" in text and "| 4 | Tests | not run:" in text


def test_sigterm_stops_the_running_stage_and_keeps_the_report(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    code = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    monkeypatch.setattr(gpu, "stage_command", lambda stage, args, result: fake_stage(code))
    monkeypatch.setattr(gpu, "STAGES", (gpu.Stage("speed", "Speed", 1.0, 0.5),))
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            gpu.main(["--rehearse", "--out", str(tmp_path), "--budget", "30"])
    finally:
        timer.cancel()
    assert stopped.value.code == 128 + signal.SIGTERM
    saved = json.loads((tmp_path / "gpu-rehearsal" / "report.json").read_text())
    assert saved["stages"][0]["status"] == "interrupted" and saved["seconds"] < 10
    with pytest.raises(ProcessLookupError):  # the stage's process went with it
        os.kill(int(pid_file.read_text()), 0)
    assert signal.getsignal(signal.SIGTERM) is not gpu._interrupt


def report_with(speed_rows: list[dict], training_rows: list[dict]) -> dict:
    return {
        "rehearsal": False,
        "stages": [
            {"name": "speed", "result": {"rows": speed_rows}},
            {"name": "training", "result": {"rows": training_rows}},
        ],
    }


def training_row(optimizer: str, graph: bool, tokens_per_s: float) -> dict:
    return {"optimizer": optimizer, "graph": graph, "tokens_per_s": tokens_per_s}


def test_targets_are_judged_from_the_rows():
    rows = [
        speed_row("(a) one", "AdaWarm", percent_of_copy=91.0),
        speed_row("(b) gpt", "AdaWarm", percent_of_copy=89.9),
        speed_row("(c) many", "torch AdamW fused", median_ms=2.0),
        speed_row("(c) many", "AdaWarm", median_ms=1.0, launches_per_step=2),
        speed_row("(c) many", "AdaWarmScheduleFree", median_ms=1.04),
        speed_row("(c) many", "schedulefree AdamWScheduleFree foreach", median_ms=2.6),
        speed_row("(b) gpt", "AdaWarmScheduleFree", median_ms=1.2),
        speed_row("(a) one", "AdaWarm, measured warmup", median_ms=1.06),
        speed_row("(a) one", "AdaWarm, 8-bit moments", median_ms=0.74),
        speed_row("(e) host", "torch AdamW fused", host_us=30.0),
        speed_row("(e) host", "AdaWarm", host_us=30.0),
    ]
    training = [
        training_row("torch AdamW fused", False, 100.0),
        training_row("AdaWarm", False, 99.0),
    ]
    found = {t["target"]: t for t in gpu_report.targets(report_with(rows, training))}
    met = {target: entry["met"] for target, entry in found.items()}
    assert met == {
        ">= 90 % of copy bandwidth: (a) one": True,
        ">= 90 % of copy bandwidth: (b) gpt": False,
        ">= 90 % of copy bandwidth: (d)": None,  # not measured
        "<= 0.5x fused AdamW's step: (c) many": True,
        "one launch per step per dtype group (each case is one group)": False,
        "host time per step no worse than fused AdamW's: (e) host": True,
        "AdaWarmScheduleFree's step <= 1.05x AdaWarm's: (b) gpt": False,
        "AdaWarmScheduleFree >= 3x faster than schedulefree's foreach step: (b) gpt": None,
        "AdaWarmScheduleFree's step <= 1.05x AdaWarm's: (c) many": True,
        "AdaWarmScheduleFree >= 3x faster than schedulefree's foreach step: (c) many": False,
        "warmup_steps='measured' <= 1.05x AdaWarm's step: (a) one": False,  # 1.06 against 1.0
        "warmup_steps='measured' <= 1.05x AdaWarm's step: (b)": None,
        "8-bit moments <= 0.75x AdaWarm's step with fp32 moments: (a) one": True,  # 0.74
        "GPT-2 training tokens/s no worse than fused AdamW's, eager": False,
        "GPT-2 training tokens/s no worse than fused AdamW's, replayed from a CUDA graph": None,
    }
    assert found["<= 0.5x fused AdamW's step: (c) many"]["measured"].startswith("0.50x")
    assert found[">= 90 % of copy bandwidth: (d)"]["measured"] == "not measured"
    speedup = "AdaWarmScheduleFree >= 3x faster than schedulefree's foreach step: (c) many"
    assert found[speedup]["measured"] == "2.5x faster"


PYTEST_OUTPUT = """\
tests/test_kernel_smoke.py::test_kernel_matches_the_torch_backend[fp32] PASSED           [ 50%]
tests/test_kernel_smoke.py::test_kernel_matches_the_torch_backend[bf16 Kahan] FAILED     [100%]
=========================== short test summary info ============================
FAILED tests/test_kernel_smoke.py::test_kernel_matches_the_torch_backend[bf16 Kahan] - Asse
========================= 1 failed, 1 passed in 3.21s ==========================
"""


def test_pytest_output_gives_each_outcome_the_summary_and_the_failures():
    command = [sys.executable, "-m", "pytest", "-k", "fp32 or bf16"]
    result = gpu.pytest_result(command, 1, PYTEST_OUTPUT)
    assert result["command"] == "pytest -k 'fp32 or bf16'"
    assert [test["outcome"] for test in result["tests"]] == ["PASSED", "FAILED"]
    assert result["tests"][1]["test"].endswith("[bf16 Kahan]")
    assert result["summary"] == "1 failed, 1 passed in 3.21s"
    assert result["failures"] == [PYTEST_OUTPUT.splitlines()[3]]
    section = "\n".join(gpu_report._pytest_section(result))
    assert "| tests/test_kernel_smoke.py | 1 failed, 1 passed |" in section


def test_the_documented_device_command_fits_a_lease():
    lines = (ROOT / "docs" / "development.md").read_text().splitlines()
    start = lines.index("<!-- device: gpu -->")
    assert lines[start + 1] == "```bash" and lines[start + 3] == "```"
    install, run = lines[start + 2].split(" && ")
    assert shlex.split(install) == [
        *("python3", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"),
        *("-e", "."),
    ]
    words = shlex.split(run)
    assert words[0] == "PYTHONUNBUFFERED=1" and words[1] == "timeout"
    # Past the budget with time to start and write the report; inside one device call (600 s).
    assert gpu.DEFAULT_BUDGET_S + 30 <= int(words[2]) <= 540
    assert words[3:] == ["python3", "-m", "bench", "gpu", "--out", "$OUT"]
