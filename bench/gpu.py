"""``python -m bench gpu``: everything a lent GPU should run, in one command (~10 minutes, no
network), and one self-describing report under ``OUT/gpu-<name>/`` (``--out bench/results``
writes it where it is committed).

1. the GPU-only tests (``pytest -m gpu``) and the kernel's property tests, which on a CUDA machine
   run the compiled kernel (misaligned views included);
2. ``bench tune`` (block size and warps) and ``bench speed`` (the kernel against torch's fused and
   foreach AdamW: ms, GB/s, % of measured copy bandwidth, launches and host time per step);
3. one number a user cares about: a training step of a GPT-2-124M-shaped model in bf16 autocast,
   tokens/s with ``torch.optim.AdamW(fused=True)`` and with AdaWarm, eager and from a captured
   CUDA graph.

Without CUDA it exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench import RUNS

KERNEL_TESTS = (
    "tests/test_triton_kernel.py",
    "tests/test_low_precision.py",
    "tests/test_compile_triton.py",
    "tests/test_atomic_step.py",
)


def no_cuda_message() -> str | None:
    if torch.cuda.is_available():
        return None
    return (
        "python -m bench gpu needs a CUDA device: torch.cuda.is_available() is False "
        f"(torch {torch.__version__})"
    )


def environment() -> dict:
    """What the numbers were measured on."""
    properties = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
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
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def run_pytest(arguments: list[str], timeout: int) -> dict:
    """Run pytest in a child process; its summary line and exit status."""
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output, status = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as error:
        output, status = str(error.stdout or "") + "\n(timed out)", None
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {
        "command": "pytest " + " ".join(arguments),
        "status": status,
        "summary": summary[-1] if summary else output.strip().splitlines()[-1:],
        "failures": failures,
        "seconds": round(time.perf_counter() - start, 1),
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(report: dict) -> str:
    lines = [f"# GPU report: {report['environment']['gpu']}", ""]
    lines += [f"- {key}: {value}" for key, value in report["environment"].items()]
    lines += ["", "## Tests", ""]
    for test in report["tests"]:
        lines.append(f"- `{test['command']}`: {test['summary']} ({test['seconds']} s)")
        lines += [f"  - {failure}" for failure in test["failures"]]
    lines += ["", "## Optimizer step (bench speed)", ""]
    lines.append("| case | optimizer | ms [middle half] | GB/s | % of copy | launches | host us |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in report["speed"]:
        low, high = row["quartiles_ms"]
        lines.append(
            f"| {row['case']} | {row['optimizer']} | {row['median_ms']:.3f} [{low:.3f}, "
            f"{high:.3f}] | {row['gb_per_s']:.0f} | {row['percent_of_copy']:.1f} | "
            f"{row['launches_per_step']} | {row['host_us']:.0f} |"
        )
    lines += ["", "## Block size and warps (bench tune)", "", report["tune_best"], ""]
    lines += ["## Training step, GPT-2 124M shapes, bf16 autocast", ""]
    lines.append("| optimizer | CUDA graph | ms/step [middle half] | tokens/s |")
    lines.append("| --- | --- | ---: | ---: |")
    for row in report["end_to_end"]:
        low, high = row["spread_ms"]
        lines.append(
            f"| {row['optimizer']} | {'yes' if row['graph'] else 'no'} | "
            f"{row['ms_per_step']:.1f} [{low:.1f}, {high:.1f}] | {row['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=RUNS,
        help=f"the report goes to OUT/gpu-<name>/ (default: {RUNS}); to commit it, "
        "--out bench/results",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences of 1024 tokens per step")
    args = parser.parse_args(argv)
    message = no_cuda_message()
    if message is not None:
        print(message, file=sys.stderr)
        raise SystemExit(2)
    from bench import gpt2, speed, tune

    env = environment()
    out = args.out / f"gpu-{slug(env['gpu'])}"
    out.mkdir(parents=True, exist_ok=True)
    tests = [
        run_pytest(["-m", "gpu"], timeout=300),
        run_pytest(list(KERNEL_TESTS), timeout=600),
    ]
    tune_rows = tune.main(["--out", str(out)])
    speed_rows = speed.main(["--out", str(out)])
    device = torch.device("cuda")
    end_to_end = [
        row
        for graph in (False, True)
        for row in gpt2.measure(gpt2.GPTConfig(), args.batch, device, steps=20, graph=graph)
    ]
    report = {
        "environment": env
        | {"copy_gb_per_s": speed.copy_bandwidth(device, 2**28, speed.Timer(device))},
        "tests": tests,
        "tune_best": "best overall (block size, warps): " + str(tune.best_overall(tune_rows)),
        "speed": [asdict(row) for row in speed_rows],
        "end_to_end": [asdict(row) for row in end_to_end],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}/report.md and report.json")
    return report
