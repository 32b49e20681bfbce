"""``python -m bench <command>`` (speed, quality, collapse, schedule, tune, gpu, adaptive,
quantization, state8bit, memory):
AdaWarm against AdamW, here.

Without a sub-command: a short tour -- a quick speed table, a quick quality run and the measured
warmup on its cells (its factor against the step), a summary, and PNG plots in bench/runs/tour/
(or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import (
    RUNS,
    adaptive,
    collapse,
    gpu,
    memory,
    quality,
    quantization,
    schedule,
    speed,
    state8bit,
    tune,
)

SUBCOMMANDS = {
    "speed": speed.main,
    "quality": quality.main,
    "collapse": collapse.main,
    "schedule": schedule.main,
    "tune": tune.main,
    "gpu": gpu.main,
    "adaptive": adaptive.main,
    "quantization": quantization.main,
    "state8bit": state8bit.main,
    "memory": memory.main,
}


def tour(out: Path) -> None:
    print("== speed (quick) ==")
    speed_rows = speed.main(["--quick", "--out", str(out)])
    print("\n== quality (quick) ==")
    result = quality.main(["--quick", "--out", str(out)])
    schedule.main(["--out", str(out)])
    print("\n== measured warmup (quick) ==")
    adaptive.main(
        [
            *("--quick", "--rules", adaptive.SHIPPED, "--out", str(out)),
            *("--optimizers", *adaptive.FAMILIES, "--baseline", str(out / "quality-quick.json")),
        ]
    )
    print("\n== summary ==")
    fused = next(r for r in speed_rows if r.optimizer == "torch AdamW fused")
    print("speed: median of 10 steps of one small case, 1 thread (middle half of the steps):")
    for row in speed_rows:
        low, high = row.quartiles_ms
        ratio = row.median_ms / fused.median_ms
        print(
            f"  {row.optimizer:24} {row.median_ms:8.2f} ms [{low:.2f}, {high:.2f}]  "
            f"({ratio:.2f}x fused AdamW)"
        )
    print(
        "quality: 1 seed, 200 steps, 2 learning rates: enough to see the harness work, not to "
        "rank optimizers (on the committed full grid, bench/results/quality.md, the spread "
        "between the seeds of a result has a median of 0.026 nats, middle half 0.010-0.052); "
        "the defaults were chosen on the full grid (docs/defaults.md, python -m bench quality):"
    )
    table, cells = result["table"], result["cells"]
    for cell in cells:
        for method in ("AdaWarm default", "AdamW no warmup", "AdamW", "schedule-free AdamW"):
            losses = [table[key] for key in table if key[:2] == (cell.name, method)]
            if losses:
                values = ", ".join(f"{r.mean:.3f}" for r in losses)
                print(f"  {cell.name}: {method}: final loss {values} at lr {cell.lrs}")
    print(f"plots and tables: {out}/")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])  # each sub-command parses (and documents) its own options
        return
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("subcommand", nargs="?", choices=sorted(SUBCOMMANDS))
    parser.add_argument(
        "--out",
        type=Path,
        default=RUNS / "tour",
        help=f"folder for the tour's tables and plots (default: {RUNS / 'tour'})",
    )
    tour(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
