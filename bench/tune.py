"""Tuning the Triton kernel's launch: elements per program (BLOCK) and warps, on a GPU.

For each case the kernel is launched directly (``adawarm.kernels.adawarm_step``: tables laid out
for the block size, then the launcher) over every (block size, warps) pair, and the step's median
time (CUDA events) is turned into GB/s from the byte count of ``bench.speed.bytes_per_param`` and
into % of the device's measured copy bandwidth. The best pair per case, and the one that is best
overall (highest worst-case % of copy), is what ``BLOCK_SIZE``/``NUM_WARPS`` should be set to,
with the measurement cited beside them.

On a CPU this runs only under ``TRITON_INTERPRET=1``, as a check that the harness works: the
interpreter's timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import RUNS
from bench.speed import (
    Case,
    Timer,
    bytes_per_param,
    copy_bandwidth,
    device_name,
    gpt2_small_shapes,
    triton_version,
)

BLOCK_SIZES = (512, 1024, 2048, 4096)
WARPS = (2, 4, 8)
WARMUP_LAUNCHES = 8  # past the rectification threshold, as in bench.speed


@dataclass(frozen=True)
class TuneCase:
    case: Case
    state_dtype: torch.dtype = torch.float32


GPU_CASES = (
    TuneCase(Case("(a) one fp32 tensor of 2^28", ((1 << 28,),))),
    TuneCase(Case("(b) GPT-2 124M fp32", gpt2_small_shapes())),
    TuneCase(Case("(c) 2000 tensors of 5000", ((5000,),) * 2000)),
    TuneCase(Case("(d) GPT-2 124M bf16 params", gpt2_small_shapes(), torch.bfloat16)),
    TuneCase(
        Case("(f) GPT-2 124M bf16 params, bf16 states", gpt2_small_shapes(), torch.bfloat16),
        torch.bfloat16,
    ),
)
QUICK_CASES = (TuneCase(Case("tiny", ((3000,), (7, 5)))),)


@dataclass
class TuneRow:
    case: str
    block_size: int
    num_warps: int
    median_ms: float
    gb_per_s: float
    percent_of_copy: float
    device: str
    torch_version: str
    triton_version: str | None
    date: str


def launch_lists(tune_case: TuneCase, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Parameters, gradients, moments and step counters for one case, as the launcher takes."""
    generator = torch.Generator(device=device).manual_seed(0)
    case = tune_case.case
    params = [
        torch.randn(shape, generator=generator, device=device).to(case.dtype)
        for shape in case.shapes
    ]
    return {
        "param": params,
        "grad": [torch.randn_like(p) for p in params],
        "exp_avg": [torch.zeros_like(p, dtype=tune_case.state_dtype) for p in params],
        "exp_avg_sq": [torch.zeros_like(p, dtype=tune_case.state_dtype) for p in params],
        "step": [torch.zeros((), device=device) for _ in params],
    }


def measure(
    tune_case: TuneCase,
    lists: dict[str, list[torch.Tensor]],
    block_size: int,
    num_warps: int,
    *,
    device: torch.device,
    timer: Timer,
    steps: int,
    copy_gbs: float,
) -> TuneRow:
    from adawarm.kernels import adawarm_step, common

    tables = common.launch_tables(lists, device, block_size=block_size)
    case = tune_case.case

    def launch() -> None:
        adawarm_step.launch_adawarm_step(
            tables,
            param_dtype=case.dtype,
            state_dtype=tune_case.state_dtype,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            warmup_steps=100,
            rectify=True,
            maximize=False,
            num_warps=num_warps,
        )

    for _ in range(WARMUP_LAUNCHES):
        launch()
    seconds = timer.median_seconds(launch, steps)
    gbs = bytes_per_param(case.dtype, tune_case.state_dtype) * case.numel / seconds / 1e9
    return TuneRow(
        case=case.name,
        block_size=block_size,
        num_warps=num_warps,
        median_ms=seconds * 1e3,
        gb_per_s=gbs,
        percent_of_copy=100 * gbs / copy_gbs,
        device=device_name(device),
        torch_version=torch.__version__,
        triton_version=triton_version(),
        date=datetime.date.today().isoformat(),
    )


def run(device, cases, configs, steps, on_row=None) -> list[TuneRow]:
    """Every (block size, warps) of ``configs`` on every case; ``on_row`` sees each row as it
    is measured."""
    timer = Timer(device)
    copy_gbs = copy_bandwidth(device, max(c.case.numel for c in cases), timer)
    rows = []
    for tune_case in cases:
        lists = launch_lists(tune_case, device)
        for block_size, num_warps in configs:
            rows.append(
                measure(
                    tune_case,
                    lists,
                    block_size,
                    num_warps,
                    device=device,
                    timer=timer,
                    steps=steps,
                    copy_gbs=copy_gbs,
                )
            )
            if on_row is not None:
                on_row(rows[-1])
        del lists
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def best_overall(rows: list[TuneRow]) -> tuple[int, int]:
    """The (block size, warps) whose worst case reaches the highest % of copy bandwidth."""
    configs = {(r.block_size, r.num_warps) for r in rows}
    return max(
        sorted(configs),
        key=lambda config: min(
            r.percent_of_copy for r in rows if (r.block_size, r.num_warps) == config
        ),
    )


def format_table(rows: list[TuneRow]) -> str:
    lines = [f"{'case':42} {'BLOCK':>5} {'warps':>5} {'ms':>9} {'GB/s':>8} {'%copy':>6}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r.case:42} {r.block_size:5d} {r.num_warps:5d} {r.median_ms:9.3f} "
            f"{r.gb_per_s:8.1f} {r.percent_of_copy:6.1f}"
        )
    block_size, num_warps = best_overall(rows)
    lines.append(f"best overall (highest worst-case %copy): BLOCK {block_size}, {num_warps} warps")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[TuneRow]:
    parser = argparse.ArgumentParser(prog="python -m bench tune", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES))
    parser.add_argument("--warps", type=int, nargs="+", default=list(WARPS))
    parser.add_argument("--steps", type=int, default=40, help="timed launches per measurement")
    parser.add_argument("--quick", action="store_true", help="a tiny case, 2 configs, 2 launches")
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    from tqdm import tqdm

    device = torch.device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("tuning needs a CUDA device (or TRITON_INTERPRET=1 to check the harness)")
    if args.quick or device.type != "cuda":
        cases, configs, steps = QUICK_CASES, [(128, 2), (1024, 4)], 2
    else:
        cases, steps = GPU_CASES, args.steps
        configs = [(b, w) for b in args.block_sizes for w in args.warps]
    with tqdm(total=len(cases) * len(configs), desc="tune", unit="config") as progress:
        rows = run(device, cases, configs, steps, on_row=lambda _: progress.update(1))
    print(format_table(rows))
    if device.type != "cuda":
        print("(Triton's interpreter on a CPU: these timings say nothing about a GPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"tune-{device.type}" + ("-quick" if args.quick else "") + ".json")
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(f"wrote {path}")
    return rows
