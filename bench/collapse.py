"""How often short runs collapse at a high rate, by warmup length: AdamW and AdaWarm side by side.

At ten times the best rate (lr 0.1 in the quality grid's short post-LN cells) whether a run
collapses (ends at or above the unigram entropy, as in ``bench.quality``) is close to a coin flip
per seed. This trains one cell at one rate with many seeds for each warmup length ``W``, with
AdamW (a linear warmup over ``W`` steps in its LambdaLR) and with AdaWarm (``warmup_steps=W``,
its default update otherwise): the same update through two implementations, so their counts
differing says how much of a difference chance alone makes. Each AdaWarm count is compared with
AdamW's at the same ``W`` by the one-sided Fisher exact test of the quality grid's collapse check.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from adawarm.optimizer import DEFAULT_RECTIFY
from bench import RUNS
from bench.grid import TRANSFORMER_LRS, Cell, Method
from bench.quality import more_collapses_p, tabulate
from bench.training import corpus, measured_heading, train_all


def methods(warmups: list[int]) -> list[Method]:
    """AdamW and AdaWarm (its default update, an explicit ramp) for each warmup length."""
    return [
        method
        for warmup in warmups
        for method in (
            Method(f"AdamW W={warmup}", "adamw", warmup),
            Method(f"AdaWarm W={warmup}", "adawarm", warmup, DEFAULT_RECTIFY),
        )
    ]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench collapse", description=__doc__)
    parser.add_argument("--architecture", default="post-LN", help="bench.lm architecture")
    parser.add_argument("--beta2", type=float, nargs="+", default=[0.95, 0.98])
    parser.add_argument("--steps", type=int, default=300, help="run length (cosine decay)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmups", type=int, nargs="+", default=[40, 50, 60, 80, 100])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="processes, 1 thread each")
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    cells = [
        Cell(args.architecture, beta2, args.steps, "cosine", TRANSFORMER_LRS, args.seeds)
        for beta2 in args.beta2
    ]
    compared = methods(args.warmups)
    jobs = [
        (cell, method, args.lr, seed, RUNS / "cache")
        for cell in cells
        for method in compared
        for seed in range(args.seeds)
    ]
    start = time.perf_counter()
    runs = train_all(jobs, args.workers, "collapse")
    threshold = corpus().unigram_entropy()
    table = tabulate(runs, {cell.name: threshold for cell in cells})
    lines = [
        measured_heading(
            args.workers,
            len(runs),
            time.perf_counter() - start,
            " ".join(["python -m bench collapse", *(argv or [])]),
        )
        + f" {args.architecture}, {args.steps} steps, "
        f"cosine, lr {args.lr:g}, seeds 0-{args.seeds - 1}; collapsed: final validation loss "
        f">= {threshold:.3f} (the unigram entropy). Each method: mean [min, max] final loss over "
        "the seeds, (n coll.) its collapsed runs; p: one-sided Fisher exact test of AdaWarm "
        "collapsing more often than AdamW at the same W.",
        "",
        "| beta2 | W | AdamW | AdaWarm | p |",
        "| ---: | ---: | --- | --- | ---: |",
    ]
    for cell in cells:
        for warmup in args.warmups:
            adamw = table[(cell.name, f"AdamW W={warmup}", args.lr)]
            adawarm = table[(cell.name, f"AdaWarm W={warmup}", args.lr)]
            lines.append(
                f"| {cell.beta2:g} | {warmup} | {adamw.text()} | {adawarm.text()} | "
                f"{more_collapses_p(adawarm, adamw):.2f} |"
            )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collapse.md").write_text(text + "\n")
    saved = {"heading": lines[0], "runs": [asdict(run) for run in runs]}
    (args.out / "collapse.json").write_text(json.dumps(saved) + "\n")
    return text
