"""Speed of one optimizer step: AdaWarm against torch's AdamW and RAdam, in the same process.

Each case is a list of parameter shapes. A step's time is the median over ``--steps`` timed
steps after warm-up steps that take every optimizer past RAdam's rectification threshold (t = 6),
so AdaWarm is measured on its steady-state (rectified) path. Bandwidth is computed from an explicit
byte count: an Adam step reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
exp_avg_sq (28 B per fp32 parameter).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adawarm import AdaWarm

WARMUP_STEPS = 8


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(torch.Size(shape).numel() for shape in self.shapes)


CPU_CASES = (
    Case("10M fp32 params in 4 tensors", ((2_500_000,),) * 4),
    Case("2000 tensors of 5000", ((5000,),) * 2000),
)

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "torch RAdam foreach": lambda ps: torch.optim.RAdam(
        ps, foreach=True, decoupled_weight_decay=True
    ),
    "AdaWarm torch backend": lambda ps: AdaWarm(
        ps, rectify=True, warmup_steps=100, backend="torch"
    ),
}


def bytes_per_step(numel: int) -> int:
    """Bytes an fp32 Adam step must move: read p, g, m, v (16 B), write p, m, v (12 B)."""
    return 28 * numel


def time_steps(optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    for _ in range(WARMUP_STEPS):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(numel: int, repeats: int = 10) -> float:
    """Measured GB/s of a large tensor copy (read + write), the practical memory limit."""
    source, target = torch.randn(numel), torch.empty(numel)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 8 * numel / statistics.median(times) / 1e9


@dataclass
class Row:
    case: str
    optimizer: str
    threads: int
    params: int
    median_ms: float
    gb_per_s: float
    percent_of_copy: float
    device: str
    torch_version: str
    date: str


def run(cases, optimizer_names, threads_list, steps, progress=None) -> list[Row]:
    rows = []
    device = platform.processor() or platform.machine()
    today = datetime.date.today().isoformat()
    for threads in threads_list:
        torch.set_num_threads(threads)
        copy_gbs = copy_bandwidth(max(case.numel for case in cases))
        for case in cases:
            generator = torch.Generator().manual_seed(0)
            params = [torch.randn(s, generator=generator).requires_grad_() for s in case.shapes]
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            for name in optimizer_names:
                snapshot = [p.detach().clone() for p in params]
                median = statistics.median(time_steps(OPTIMIZERS[name](params), steps))
                with torch.no_grad():
                    for param, saved in zip(params, snapshot, strict=True):
                        param.copy_(saved)
                gbs = bytes_per_step(case.numel) / median / 1e9
                rows.append(
                    Row(
                        case.name,
                        name,
                        threads,
                        case.numel,
                        median * 1e3,
                        gbs,
                        100 * gbs / copy_gbs,
                        device,
                        torch.__version__,
                        today,
                    )
                )
                if progress is not None:
                    progress.update(1)
    return rows


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'case':32} {'optimizer':24} {'thr':>3} {'ms':>9} {'GB/s':>7} {'%copy':>6} "
        f"{'vs fused':>8}"
    )
    print(header)
    print("-" * len(header))
    fused = {(r.case, r.threads): r.median_ms for r in rows if r.optimizer == "torch AdamW fused"}
    for r in rows:
        ratio = (
            r.median_ms / fused[(r.case, r.threads)]
            if (r.case, r.threads) in fused
            else float("nan")
        )
        print(
            f"{r.case:32} {r.optimizer:24} {r.threads:>3} {r.median_ms:9.2f} {r.gb_per_s:7.2f} "
            f"{r.percent_of_copy:6.1f} {ratio:8.2f}x"
        )


def write_results(rows: list[Row], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed-cpu.json"
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    from tqdm import tqdm

    total = len(args.threads) * len(CPU_CASES) * len(OPTIMIZERS)
    with tqdm(total=total, desc="speed", unit="run") as progress:
        rows = run(CPU_CASES, list(OPTIMIZERS), args.threads, args.steps, progress)
    print_table(rows)
    print(f"results: {write_results(rows, args.out)}")
