"""``python -m bench gpu``: what a lent GPU should run first, sized to a short lease.

Five stages, in order of value, each in a child process with its share of ``--budget`` (6
minutes by default, so that a rerun fits a 15-minute lease):

1. smoke correctness: tests/test_kernel_smoke.py, the compiled kernel against the torch backend
   (parameters and all state, 12 steps) on fp32/bf16/fp16 parameters, bf16 moments, Kahan and
   stochastic rounding, odd and misaligned sizes, a GradScaler skip, a replayed CUDA graph;
2. the headline speed rows (:mod:`bench.gpu_stages`): one fp32 tensor of 2^28, GPT-2-124M shapes
   in fp32 and bf16, 2000 tensors of 5000, host time at 500 tensors, each against
   ``torch.optim.AdamW(fused=True)``, with the measured copy bandwidth and launches per step
   (and, on the 2^28 tensor, AdaWarm with 8-bit moments);
3. a GPT-2-124M training step in bf16 autocast, tokens/s, fused AdamW against AdaWarm, eager and
   replayed from a CUDA graph;
4. the GPU-only tests and the kernel's property tests on the compiled kernel;
5. ``bench tune``: block size and warps.

After every stage the report (``report.md`` and ``report.json`` in ``OUT/gpu-<name>/``) is
rewritten, so whatever ran is on disk if the command is killed. A stage that fails is recorded
with the last lines of its output and the next stage runs; a stage that outruns its share is
stopped, keeping what it measured; a stage the budget cannot fit is listed as not run. The
report closes with the kernel's targets, met or missed.

``--rehearse`` runs every stage on the CPU (the kernel under Triton's interpreter, tiny sizes,
CPU timers, the capturable step in place of a graph replay), writing the same report to
``OUT/gpu-rehearsal/``: CI runs it, so a GPU run cannot fail on a line that never ran. Without
CUDA and without ``--rehearse`` it exits with status 2 and a one-line message; when a stage
does not end well (failed, stopped, not run) with status 1, after writing the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import RUNS
from bench.gpu_report import markdown, targets

DEFAULT_BUDGET_S = 360
# The stages that run pytest, and their files; the rehearsal runs a few tests of each (-k): the
# same code path, in seconds.
PYTEST_FILES = {
    "smoke": ("tests/test_kernel_smoke.py",),
    "tests": (
        "tests/test_gpu.py",  # pytest -m gpu: every GPU-only test lives here
        "tests/test_promises.py",  # every promise, the kernel's compiled for the GPU
        "tests/test_triton_kernel.py",
        "tests/test_schedule_free_kernel.py",
        "tests/test_low_precision.py",
        "tests/test_compile_triton.py",
        "tests/test_atomic_step.py",
    ),
}
REHEARSAL_SELECTION = {
    "smoke": "fp32 and not bf16",
    "tests": "one_launch_per_step or misaligned_pointer",
}
OUTPUT_TAIL_LINES = 15


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    share: float  # of the budget, passed on to later stages when unused
    minimum_s: float  # not started with less left


# Shares and minimums are estimates until a GPU run times the stages (its report's seconds
# column): the smoke cases compile ~15 kernel variants (~0.3 s each for ptxas on this project's
# 2-core CPU machines: 241 in ~75 s), the tests stage runs inductor and ~25 hypothesis examples
# per property, which may not fit its share; it then reports the tests that ran.
STAGES = (
    Stage("smoke", "Smoke correctness: compiled kernel against the torch backend", 0.25, 30),
    Stage("speed", "Optimizer step: the headline rows", 0.20, 30),
    Stage("training", "Training step, GPT-2 124M shapes, bf16 autocast", 0.15, 30),
    Stage("tests", "GPU-only and kernel property tests", 0.25, 30),
    Stage("tune", "Block size and warps (bench tune)", 0.15, 20),
)


def no_cuda_message() -> str | None:
    if torch.cuda.is_available():
        return None
    return (
        "python -m bench gpu needs a CUDA device: torch.cuda.is_available() is False "
        f"(torch {torch.__version__}); --rehearse runs every stage on the CPU"
    )


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(rehearse: bool) -> dict:
    """What the numbers were measured on."""
    common = {
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if rehearse:
        return {"gpu": "none: a rehearsal on the CPU", "cpu": platform.machine()} | common
    properties = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {
        "gpu": properties.name,
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
        "driver": driver,
        "cuda": torch.version.cuda,
    } | common


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Interrupted(Exception):
    """The command was told to stop (SIGTERM, e.g. from ``timeout``)."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


# A stage runs in a process group of its own, so that stopping it stops what it started (pytest's
# and inductor's workers). Not a session of its own: a session outlives the command that a lease
# runs, a group in the command's session does not. Python 3.11+ sets the group in the forked child
# before exec; a preexec_fn runs Python there, which can deadlock in a process with threads (the
# CUDA driver's).
OWN_PROCESS_GROUP = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
)


def run_child(command: list[str], env: dict, limit_s: float, log: Path) -> tuple[int | None, str]:
    """Run ``command`` in a process group of its own for at most ``limit_s`` seconds, its output
    appended to ``log``; its exit status (None: stopped at the limit) and its output."""
    with log.open("a") as handle:
        handle.write(f"\n$ {shlex.join(command)}\n")
        handle.flush()
        start = handle.tell()
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, **OWN_PROCESS_GROUP
        )
        try:
            status = process.wait(timeout=limit_s)
        except BaseException:  # the limit, or an interruption of the parent
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
            status = None
    with log.open() as handle:
        handle.seek(start)
        return status, handle.read()


def tail(output: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    return "\n".join(output.rstrip().splitlines()[-lines:])


PYTEST_OUTCOME = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
PYTEST_SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|error|errors|deselected).*) =+$")


def pytest_result(command: list[str], status: int | None, output: str) -> dict:
    """Per-test outcomes (pytest -v), the summary line and the failures, from pytest's output."""
    outcomes = [
        {"test": match[1], "outcome": match[2]}
        for line in output.splitlines()
        if (match := PYTEST_OUTCOME.match(line))
    ]
    summaries = [match[1] for line in output.splitlines() if (match := PYTEST_SUMMARY.match(line))]
    failures = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {
        "command": shlex.join(["pytest", *command[3:]]),
        "exit_status": status,
        "summary": summaries[-1] if summaries else None,
        "tests": outcomes,
        "failures": failures,
    }


def stage_command(stage: Stage, args: argparse.Namespace, result_file: Path) -> list[str]:
    """The child process of a stage: pytest, or :mod:`bench.gpu_stages` writing ``result_file``."""
    if stage.name in PYTEST_FILES:
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
        command += PYTEST_FILES[stage.name]
        return command + (["-k", REHEARSAL_SELECTION[stage.name]] if args.rehearse else [])
    command = [sys.executable, "-m", "bench.gpu_stages", stage.name, str(result_file)]
    return command + ["--batch", str(args.batch)] + (["--rehearse"] if args.rehearse else [])


def run_stage(stage: Stage, limit_s: float, args: argparse.Namespace, out: Path) -> dict:
    """Run one stage in a child process; its record for the report."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.rehearse:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    result_file = out / f"{stage.name}.json"
    result_file.unlink(missing_ok=True)
    command = stage_command(stage, args, result_file)
    status, output = run_child(command, env, limit_s, out / "stages.log")
    if stage.name in PYTEST_FILES:
        result = pytest_result(command, status, output)
    else:
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        result_file.unlink(missing_ok=True)
    record = {"result": result}
    if status == 0:
        return record | {"status": "ok", "outcome": "ok"}
    record["output_tail"] = tail(output)
    if status is None:
        outcome = f"stopped at its limit of {limit_s:.0f} s, keeping what it measured"
        return record | {"status": "stopped", "outcome": outcome}
    return record | {"status": "failed", "outcome": f"failed (exit status {status})"}


def run_all(args: argparse.Namespace, out: Path, report: dict, deadline: float) -> None:
    """Every stage that fits before ``deadline`` (``time.monotonic()``), the report rewritten
    after each."""
    for index, stage in enumerate(STAGES):
        left = deadline - time.monotonic()
        record = {"name": stage.name, "title": stage.title}
        report["stages"].append(record)
        if left < stage.minimum_s:
            record |= {
                "status": "not run",
                "outcome": f"not run: {left:.0f} s of the budget left, it needs "
                f"{stage.minimum_s} s",
            }
            write_report(report, out)
            continue
        shares_left = sum(later.share for later in STAGES[index:])
        limit = min(left, max(stage.minimum_s, left * stage.share / shares_left))
        print(f"[{index + 1}/{len(STAGES)}] {stage.title} (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            record |= run_stage(stage, limit, args, out)
        except Interrupted as signal_name:
            record |= {"status": "interrupted", "outcome": f"interrupted by {signal_name}"}
            raise
        finally:
            record["seconds"] = round(time.monotonic() - start, 1)
            write_report(report, out)
        print(f"      {record['outcome']} ({record['seconds']} s)", flush=True)


def write_report(report: dict, out: Path) -> None:
    report["targets"] = targets(report)
    for name, text in (
        ("report.json", json.dumps(report, indent=2) + "\n"),
        ("report.md", markdown(report)),
    ):
        partial = out / (name + ".partial")
        partial.write_text(text)
        os.replace(partial, out / name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=RUNS,
        help=f"the report goes to OUT/gpu-<name>/ (default: {RUNS}); to commit it, "
        "--out bench/results",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for all stages (default: {DEFAULT_BUDGET_S})",
    )
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="run every stage on the CPU at tiny sizes (Triton's interpreter): figures "
        "meaningless, code paths all run",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences of 1024 tokens per step")
    args = parser.parse_args(argv)
    start = time.monotonic()
    message = None if args.rehearse else no_cuda_message()
    if message is not None:
        print(message, file=sys.stderr)
        raise SystemExit(2)
    env = environment(args.rehearse)
    out = args.out / ("gpu-rehearsal" if args.rehearse else f"gpu-{slug(env['gpu'])}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.log").write_text("")
    report = {
        "rehearsal": args.rehearse,
        "command": shlex.join(["python", "-m", "bench", "gpu", *(argv or [])]),
        "budget_s": args.budget,
        "environment": env,
        "stages": [],
    }
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_all(args, out, report, deadline=start + args.budget)
    except Interrupted as signal_name:
        print(f"interrupted by {signal_name}; the report holds the stages before", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        report["seconds"] = round(time.monotonic() - start, 1)
        write_report(report, out)
    print(markdown(report))
    print(f"wrote {out}/report.md and report.json")
    if any(stage["status"] != "ok" for stage in report["stages"]):
        raise SystemExit(1)  # the report says which stage, and why
    return report
