"""The measuring stages of ``python -m bench gpu``, each in a child process of its own:
``python -m bench.gpu_stages STAGE RESULT [--rehearse] [--batch N]``.

A child per stage, because a stage can fail in ways that end more than itself: an illegal memory
access leaves the process's CUDA context unusable, a hang never returns. In a child it costs that
stage alone, and the parent (:mod:`bench.gpu`) can stop it at its share of the budget. The child
rewrites RESULT (JSON) after every row it measures, so a stage stopped midway still reports what
it measured.

With ``--rehearse`` every stage runs on the CPU at tiny sizes: the kernel under Triton's
interpreter (the parent sets ``TRITON_INTERPRET=1``), CPU timers, and a CUDA graph's replay
replaced by the same capturable step (:func:`bench.graphs.replayable`). Its figures say nothing
about a GPU; it is there so that a GPU run cannot fail on a line that never ran.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from adawarm.schedule import MEASURED as MEASURED_WARMUP
from bench import gpt2, speed, tune
from bench.gpu_report import (
    EIGHT_BIT,
    EIGHT_BIT_CASES,
    MEASURED,
    MEASURED_CASES,
    SCHEDULE_FREE,
    SCHEDULE_FREE_CASES,
    SCHEDULEFREE,
)
from bench.speed import Case, gpt2_small_shapes

# The headline rows of stage 2; each against torch.optim.AdamW(fused=True) in the same process.
HEADLINE_CASES = (
    Case("(a) one fp32 tensor of 2^28", ((1 << 28,),)),
    Case("(b) GPT-2 124M fp32", gpt2_small_shapes()),
    Case("(d) GPT-2 124M bf16 params", gpt2_small_shapes(), torch.bfloat16),
    Case("(c) 2000 tensors of 5000", ((5000,),) * 2000),
    Case("(e) 500 tensors of 4096 (host time)", ((4096,),) * 500),
)
# The same kinds of case, small enough for the interpreter (~3 ms a program).
REHEARSAL_CASES = (
    Case("(a) one fp32 tensor of 2^12", ((1 << 12,),)),
    Case("(b) GPT-2 layout at width 8, fp32", gpt2_small_shapes(8, 64, 16, 1)),
    Case(
        "(d) GPT-2 layout at width 8, bf16 params", gpt2_small_shapes(8, 64, 16, 1), torch.bfloat16
    ),
    Case("(c) 20 tensors of 50", ((50,),) * 20),
    Case("(e) 5 tensors of 40 (host time)", ((40,),) * 5),
)
HEADLINE_OPTIMIZERS = {
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "AdaWarm": speed.adawarm_factory("triton"),
}


def headline_optimizers(case: speed.Case) -> dict[str, speed.OptimizerFactory]:
    """The headline rows of ``case``; the report's schedule-free cases also time the
    schedule-free kernel, and schedulefree's foreach step where that package is installed (the
    GPU image lacks it); its measured-warmup cases AdaWarm with ``warmup_steps="measured"``; its
    8-bit cases AdaWarm with 8-bit moments."""
    table = dict(HEADLINE_OPTIMIZERS)
    if case.name.startswith(EIGHT_BIT_CASES):
        table[EIGHT_BIT] = speed.adawarm_factory("triton", state_dtype=torch.uint8)
    if case.name.startswith(MEASURED_CASES):
        table[MEASURED] = speed.adawarm_factory("triton", MEASURED_WARMUP)
    if case.name.startswith(SCHEDULE_FREE_CASES):
        table[SCHEDULE_FREE] = speed.schedule_free_factory("triton")
        reference = speed.schedulefree_factory()
        if reference is not None:
            table[SCHEDULEFREE] = reference
    return table


TIMED_STEPS = 40
REHEARSAL_STEPS = 3

TRAINING_STEPS = 20
REHEARSAL_MODEL = gpt2.GPTConfig(vocab=64, context=16, width=32, layers=1, heads=2)


class ResultFile:
    """The stage's result, rewritten whole after every change (a reader never sees half)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {}

    def update(self, **entries) -> None:
        self.data.update(entries)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(partial, self.path)


def device_for(rehearse: bool) -> torch.device:
    if rehearse:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("a rehearsal runs the kernel under TRITON_INTERPRET=1")
        return torch.device("cpu")
    return torch.device("cuda")


def speed_stage(result: ResultFile, args: argparse.Namespace) -> None:
    """The headline rows: ms, GB/s, % of the measured copy bandwidth, launches and host time per
    step, AdaWarm's kernel and torch's fused AdamW on each case."""
    device = device_for(args.rehearse)
    cases = REHEARSAL_CASES if args.rehearse else HEADLINE_CASES
    steps = REHEARSAL_STEPS if args.rehearse else TIMED_STEPS
    timer = speed.Timer(device)
    copy_gbs = speed.copy_bandwidth(device, max(case.numel for case in cases), timer)
    result.update(copy_gb_per_s=copy_gbs, rows=[])
    for case in cases:
        for name, factory in headline_optimizers(case).items():
            row = speed.measure(
                case,
                name,
                factory,
                device,
                timer,
                steps,
                copy_gbs,
                host_time=True,
                # A rehearsal times the interpreter: no need to pass RAdam's threshold first.
                warmup_steps=1 if args.rehearse else speed.WARMUP_STEPS,
            )
            result.update(rows=[*result.data["rows"], asdict(row)])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(speed.format_table([speed.Row(**row) for row in result.data["rows"]]))


def training_stage(result: ResultFile, args: argparse.Namespace) -> None:
    """A training step of a GPT-2-124M-shaped model in bf16 autocast, tokens/s, eager and
    replayed from a CUDA graph."""
    device = device_for(args.rehearse)
    config = REHEARSAL_MODEL if args.rehearse else gpt2.GPTConfig()
    steps = REHEARSAL_STEPS if args.rehearse else TRAINING_STEPS
    batch = 2 if args.rehearse else args.batch
    result.update(batch=batch, context=config.context, rows=[])
    for graph in (False, True):
        rows = gpt2.measure(config, batch, device, steps=steps, graph=graph)
        result.update(rows=[*result.data["rows"], *map(asdict, rows)])
        for row in rows:
            print(f"{row.optimizer:20} graph={row.graph!s:5} {row.tokens_per_s:12,.0f} tokens/s")


def tune_stage(result: ResultFile, args: argparse.Namespace) -> None:
    """``bench tune``: the kernel's block size and warps."""
    device = device_for(args.rehearse)
    if args.rehearse:
        cases, configs, steps = tune.QUICK_CASES, [(128, 2), (1024, 4)], REHEARSAL_STEPS
    else:
        cases, steps = tune.GPU_CASES, TIMED_STEPS
        configs = [(b, w) for b in tune.BLOCK_SIZES for w in tune.WARPS]
    result.update(rows=[])

    def record(row: tune.TuneRow) -> None:
        rows = [*result.data["rows"], asdict(row)]
        best = tune.best_overall([tune.TuneRow(**r) for r in rows])
        result.update(rows=rows, best_overall=list(best))

    rows = tune.run(device, cases, configs, steps, on_row=record)
    print(tune.format_table(rows))


STAGES = {"speed": speed_stage, "training": training_stage, "tune": tune_stage}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_stages", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("result", type=Path, help="the JSON file the stage rewrites")
    parser.add_argument("--rehearse", action="store_true", help="on the CPU, at tiny sizes")
    parser.add_argument("--batch", type=int, default=8, help="training: sequences per step")
    args = parser.parse_args(argv)
    STAGES[args.stage](ResultFile(args.result), args)


if __name__ == "__main__":
    main()
