"""``python -m bench state8bit``: 8-bit optimizer state (issue 27), prototyped around the
optimizers' PyTorch backend before it is built into the step, and compared seed by seed with
the committed quality grid.

After every step of a run, each listed state entry of every tensor of at least
``MIN_8BIT_SIZE`` elements goes through an 8-bit store (``adawarm.quantization``: the first
moment and ``z`` on the signed map, the second moment as its square root; stochastic rounding
from the counter-based stream of the run's seed, the tensor's position, the step and the
entry's role): the next step reads what an 8-bit state would hold. Each method is the
committed grid's method of the same settings with fp32 state but for that, so their runs
share seeds (the same initialisation and batches) and are compared by the paired differences
of their final validation losses, with a one-sided 95 % bound against a margin (issue 27: 8-bit
state within 0.01 nats of fp32 state in every cell, bf16 parameters with stochastic rounding
and 8-bit state within 0.02), and by collapses.

The optimizers' own ``state_dtype=torch.uint8`` trains as the same variants without the
prototype's stores. The peers -- bitsandbytes' and torchao's 8-bit AdamW, where they install --
train as the grid's AdamW in its place (its 5 % warmup; under the user's warmup where the cell
has one) and are compared with it the same way. ``--extra-seeds`` trains a variant and its
reference at seeds past the grid's, where its seeds leave a comparison undecided; reports of
several runs are rebuilt together by ``--report-from``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch.optim import Optimizer

from adawarm.quantization import FIRST_MOMENT, MIN_8BIT_SIZE, QUANTIZATION_BLOCK, SECOND_MOMENT
from adawarm.rounding import EXP_AVG_ROLE, EXP_AVG_SQ_ROLE, stream_base
from bench import RUNS
from bench.grid import (
    DEFAULT_NAME,
    PRECISION_LIMIT,
    PRECISION_LR,
    SCHEDULE_FREE_DEFAULT,
    TUNED_WARMUPS,
    USER_SCHEDULE,
    USER_SCHEDULE_ADAMW,
    Cell,
    Method,
    full_grid,
    methods_for,
    precision_methods,
    tuned_name,
)
from bench.paired import paired_difference
from bench.peers import BY_KIND, EIGHT_BIT_PEERS
from bench.quality import Result, collapses_more, load_runs
from bench.quantization import stored
from bench.training import Run, measured_heading, train_methods

COMMITTED_GRID = Path(__file__).resolve().parent / "results" / "quality.json"
# The code and the random stream's role of each entry that can be stored in 8 bits.
CODES = {
    "exp_avg": (FIRST_MOMENT, EXP_AVG_ROLE),
    "z": (FIRST_MOMENT, EXP_AVG_ROLE),  # AdaWarmScheduleFree's first state
    "exp_avg_sq": (SECOND_MOMENT, EXP_AVG_SQ_ROLE),
}
MARGIN = 0.01  # nats: 8-bit state against fp32 state
# The peers warm up as the grid's AdamW with the shorter of its tuned warmups.
PEER_WARMUP = TUNED_WARMUPS[0]


def store_in_eight_bits(optimizer: Optimizer, entries: tuple[str, ...], seed: int, step: int):
    """Replace ``entries`` of each large tensor's state by their 8-bit store (fp32 again)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for position, param in enumerate(params):
        state = optimizer.state.get(param)
        if not state or param.numel() < MIN_8BIT_SIZE:
            continue
        for entry in entries:
            code, role = CODES[entry]
            values = state[entry]
            base = stream_base(seed, position, step, role)
            values.copy_(stored(values.float(), code, QUANTIZATION_BLOCK, base).view_as(values))


@dataclass(frozen=True)
class Variant:
    """A method with 8-bit state: the committed grid's ``trained_as`` (else ``reference``) with
    ``entries`` stored in 8 bits, compared with ``reference`` at ``margin``, in the cells
    ``precision_only`` restricts it to. ``option``: by the optimizer's own
    ``state_dtype=torch.uint8`` (which stores ``entries``), else by the prototype's stores."""

    name: str
    reference: str
    entries: tuple[str, ...]
    margin: float
    precision_only: bool = False
    # the grid's method it trains as, with 8-bit entries (default: the reference)
    trained_as: str | None = None
    option: bool = False
    # a peer's kind (bench.peers): another library's 8-bit AdamW, trained as the grid's AdamW of
    # ``reference`` in its place, or as its plain AdamW where the user's schedule warms it up
    peer: str | None = None

    def reference_in(self, cell: str) -> str:
        """The grid's method it is compared with in ``cell`` (a cell's name)."""
        return USER_SCHEDULE_ADAMW if self.peer and USER_SCHEDULE in cell else self.reference

    def against(self) -> str:
        """What it is compared with, as a report heading says it."""
        if self.peer:
            return f"{self.reference} ({USER_SCHEDULE_ADAMW} in the {USER_SCHEDULE} cells)"
        return self.reference


VARIANTS = (
    Variant(f"{DEFAULT_NAME}, 8-bit moments", DEFAULT_NAME, ("exp_avg", "exp_avg_sq"), MARGIN),
    Variant(
        f"{SCHEDULE_FREE_DEFAULT}, 8-bit second moment",
        SCHEDULE_FREE_DEFAULT,
        ("exp_avg_sq",),
        MARGIN,
    ),
    Variant(
        f"{SCHEDULE_FREE_DEFAULT}, 8-bit second moment and z",
        SCHEDULE_FREE_DEFAULT,
        ("exp_avg_sq", "z"),
        MARGIN,
        precision_only=True,
    ),
    # against fp32 parameters and state, at the low-precision rows' limit (bench.quality)
    Variant(
        f"{DEFAULT_NAME}, bf16 params + stochastic rounding + 8-bit moments",
        DEFAULT_NAME,
        ("exp_avg", "exp_avg_sq"),
        PRECISION_LIMIT,
        precision_only=True,
        trained_as=f"{DEFAULT_NAME}, bf16 params + stochastic rounding",
    ),
    # the option itself
    Variant(
        f"{DEFAULT_NAME}, state_dtype=torch.uint8",
        DEFAULT_NAME,
        ("exp_avg", "exp_avg_sq"),
        MARGIN,
        option=True,
    ),
    Variant(
        f"{SCHEDULE_FREE_DEFAULT}, state_dtype=torch.uint8",
        SCHEDULE_FREE_DEFAULT,
        ("exp_avg_sq",),
        MARGIN,
        option=True,
    ),
    Variant(
        f"{DEFAULT_NAME}, bf16 params + stochastic rounding + state_dtype=torch.uint8",
        DEFAULT_NAME,
        ("exp_avg", "exp_avg_sq"),
        PRECISION_LIMIT,
        precision_only=True,
        trained_as=f"{DEFAULT_NAME}, bf16 params + stochastic rounding",
        option=True,
    ),
    # the peers, on the grid's AdamW with its shorter tuned warmup
    *(
        Variant(f"{peer.package} {peer.name}", tuned_name(PEER_WARMUP), (), MARGIN, peer=peer.kind)
        for peer in EIGHT_BIT_PEERS
    ),
)


def grid_method(name: str, cell: Cell) -> Method:
    """The committed grid's method ``name`` in ``cell``."""
    return next(m for m in (*methods_for(cell), *precision_methods()) if m.name == name)


def method_of(variant: Variant, cell: Cell) -> Method:
    """The grid's method ``variant`` trains as in ``cell``, with 8-bit ``entries``."""
    trained_as = grid_method(variant.trained_as or variant.reference_in(cell.name), cell)
    if variant.peer:
        storage = {"kind": variant.peer}
    elif variant.option:
        storage = {"state_dtype": "uint8"}
    else:
        storage = {"eight_bit": variant.entries}
    return replace(
        trained_as,
        name=variant.name,
        **storage,
        is_default=False,
        is_schedule_free_default=False,
    )


def cells_of(variant: Variant, cells: list[Cell], precision_cell: str) -> list[Cell]:
    """The cells ``variant`` trains in: the precision cell at its rate, or every cell."""
    if variant.precision_only:
        return [replace(c, lrs=(PRECISION_LR,)) for c in cells if c.name == precision_cell]
    return cells


def compare(
    variant: Variant, runs: list[Run], saved: list[Run], collapse_at: dict[str, float]
) -> list[str]:
    """The variant against its reference, per cell and rate: means, the paired difference with
    its interval and verdict at the margin, collapses; then the tallies."""
    losses: dict[tuple[str, str, float], dict[int, float]] = {}
    for run in [*saved, *runs]:
        losses.setdefault((run.cell, run.method, run.lr), {})[run.seed] = run.final_loss
    lines = [
        f"### {variant.name}, against {variant.against()} (margin {variant.margin})",
        "",
        "| cell | lr | mean, 8-bit | mean, reference | 8-bit - reference | verdict | "
        "collapsed (8-bit / reference) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    verdicts, more_collapses = [], 0
    for cell, _, lr in sorted({(r.cell, r.method, r.lr) for r in runs if r.method == variant.name}):
        mine = losses[(cell, variant.name, lr)]
        theirs = {
            s: x
            for s, x in losses.get((cell, variant.reference_in(cell), lr), {}).items()
            if s in mine
        }
        limit = collapse_at.get(cell, math.inf)
        results = [
            Result(list(side.values()), sum(not (x < limit) for x in side.values()), list(side))
            for side in (mine, theirs)
        ]
        collapsed = [result.collapsed for result in results]
        more_collapses += bool(theirs) and collapses_more(*results)
        paired = paired_difference(mine, theirs)
        verdict = "-" if paired is None else paired.verdict(variant.margin)
        if paired is not None:
            verdicts.append(verdict)
        means = [_mean(side) for side in (mine, theirs)]
        lines.append(
            f"| {cell} | {lr:g} | {means[0]:.3f} | {means[1]:.3f} | "
            f"{'-' if paired is None else paired.text()} | {verdict} | "
            f"{collapsed[0]} / {collapsed[1]} |"
        )
    tally = ", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(verdicts)))
    lines += [
        "",
        f"- within {variant.margin} nats of the reference: {tally or 'nothing compared'} "
        f"(of {len(verdicts)}); collapses where the reference has none, or significantly more "
        f"(as the quality report counts them): at {more_collapses} rates",
    ]
    return lines


def _mean(losses: dict[int, float]) -> float:
    values = list(losses.values())
    return sum(values) / len(values) if values else math.nan


def seeds_to_train(cell: Cell, extra: int) -> range:
    """The cell's seeds, or ``extra`` seeds past them."""
    return range(cell.seeds, cell.seeds + extra) if extra else range(cell.seeds)


def unavailable(variant: Variant) -> str | None:
    """Why a peer's variant cannot train here (its package does not import), else None."""
    if not variant.peer:
        return None
    try:
        BY_KIND[variant.peer].load()
    except Exception as error:  # the package's own import errors too
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return None


def trained_variants(parser: argparse.ArgumentParser, names: list[str] | None) -> list[Variant]:
    """The variants ``--variants`` names, each able to train here (else a parser error), or
    all of those that can."""
    if not names:
        return [v for v in VARIANTS if unavailable(v) is None]
    variants = [v for v in VARIANTS if v.name in names]
    for variant in variants:
        if (why := unavailable(variant)) is not None:
            parser.error(f"{variant.name} cannot train here: {why}")
    return variants


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench state8bit", description=__doc__)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[v.name for v in VARIANTS],
        metavar="VARIANT",
        help="what to train (default: all, the peers where they install): "
        + "; ".join(v.name for v in VARIANTS),
    )
    parser.add_argument(
        "--only", action="append", help="cells whose name contains this text (repeatable)"
    )
    parser.add_argument("--lrs", type=float, nargs="+", help="only these learning rates")
    parser.add_argument("--seeds", type=int, help="at most this many seeds per cell")
    parser.add_argument(
        "--extra-seeds",
        type=int,
        metavar="N",
        help="train N seeds past the saved grid's, each variant's reference too",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes, 1 thread each")
    parser.add_argument("--baseline", type=Path, default=COMMITTED_GRID, help="the saved grid")
    parser.add_argument(
        "--report-from",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="train nothing: rebuild the report from runs' state8bit.json files, together",
    )
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    saved_cells, saved, _, _ = load_runs(args.baseline)
    saved_json = json.loads(args.baseline.read_text())
    collapse_at, precision_cell = saved_json["collapse_at"], saved_json["precision_cell"]
    cells = [c for c in full_grid() if any(s.name == c.name for s in saved_cells)]
    if args.only:
        cells = [c for c in cells if any(text in c.name for text in args.only)]
    if args.lrs:
        cells = [replace(c, lrs=tuple(lr for lr in c.lrs if lr in args.lrs)) for c in cells]
    if args.seeds and args.extra_seeds:
        parser.error("--seeds and --extra-seeds: the extra seeds follow all the grid's")
    if args.seeds:
        cells = [replace(c, seeds=min(c.seeds, args.seeds)) for c in cells]
    if args.report_from:  # the runs say what they trained: nothing to import
        saved_runs = [json.loads(path.read_text()) for path in args.report_from]
        headings = [saved_run["heading"] for saved_run in saved_runs]
        heading = headings[0] if len(headings) == 1 else "\n".join(f"- {h}" for h in headings)
        runs = [Run(**run) for saved_run in saved_runs for run in saved_run["runs"]]
        variants = [v for v in VARIANTS if any(run.method == v.name for run in runs)]
    else:
        variants = trained_variants(parser, args.variants)
        trained = [(v, c) for v in variants for c in cells_of(v, cells, precision_cell)]
        pairs = [(cell, method_of(variant, cell)) for variant, cell in trained]
        extra = args.extra_seeds or 0
        if extra:  # the references' runs at the new seeds, once each
            references = dict.fromkeys((c, v.reference_in(c.name)) for v, c in trained)
            pairs += [(cell, grid_method(name, cell)) for cell, name in references]
        start = time.perf_counter()
        seeds_of = functools.partial(seeds_to_train, extra=extra)
        runs = train_methods(pairs, args.workers, "state8bit", seeds_of)
        heading = measured_heading(
            args.workers,
            len(runs),
            time.perf_counter() - start,
            " ".join(["python -m bench state8bit", shlex.join(argv or [])]).strip(),
        )
        versions = [BY_KIND[v.peer].label() for v in variants if v.peer]
        if versions:
            heading += f" Peers: {', '.join(versions)}."
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_from:
        record = {"heading": heading, "runs": [asdict(run) for run in runs]}
        (args.out / "state8bit.json").write_text(json.dumps(record) + "\n")
    lines = [
        heading,
        "",
        f"Compared with {args.baseline.name}, seed by seed: each difference is the 8-bit run's "
        "final validation loss minus the reference's (a peer's: its run minus the grid's AdamW "
        "run), the mean over the seeds with Student's t 90 % interval (each bound one-sided "
        "95 %).",
    ]
    for variant in variants:
        lines += ["", *compare(variant, runs, saved, collapse_at)]
    text = "\n".join(lines)
    (args.out / "state8bit.md").write_text(text + "\n")
    print(text)
    return text
