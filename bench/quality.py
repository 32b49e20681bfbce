"""Training quality: AdaWarm's defaults against AdamW (without warmup and with a warmup tuned per
cell), RAdam and schedule-free AdamW, on the grid of ``bench.grid``.

Every optimizer sees the same initialisation and batches per seed. Each run reports its final
held-out validation loss (nats per byte). A run *collapses* when that loss is non-finite or at or
above the unigram entropy of its training text (the loss of a model that learned byte
frequencies only). The defaults must, in every cell:

1. at the learning rate where the better of AdamW without warmup and AdamW with the tuned warmup
   does best, end within 0.03 nats of it;
2. not collapse at a rate where AdamW with the tuned warmup does not, nor significantly more
   often than it where it does (one-sided Fisher exact test, p < 0.05);
3. under the user's own warmup and cosine, end within 0.03 nats of AdamW under the same schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import RUNS
from bench.grid import (
    ADAMW_NO_WARMUP,
    DEFAULT_NAME,
    PRECISION_LIMIT,
    PRECISION_LR,
    SCHEDULE_FREE,
    SCHEDULE_FREE_NO_WARMUP,
    TUNED_WARMUPS,
    USER_SCHEDULE,
    Cell,
    Method,
    full_grid,
    keeps_small_updates,
    methods_for,
    precision_cell,
    precision_methods,
    quick_grid,
    tuned_name,
    with_beta2,
)
from bench.paired import PairedDifference, paired_difference
from bench.training import Run, corpus, fine_tuning, measured_heading, pretrain, train_all

LIMIT = 0.03  # nats: the promise of the defaults


@dataclass
class Result:
    """The runs of one method at one learning rate in one cell."""

    losses: list[float]
    collapsed: int
    seeds: list[int] = field(default_factory=list)  # the seed of each loss, in order

    @property
    def by_seed(self) -> dict[int, float]:
        return dict(zip(self.seeds, self.losses, strict=True))

    @property
    def mean(self) -> float:
        """Seed mean; infinite when any seed diverged (the mean would hide it)."""
        if not all(math.isfinite(x) for x in self.losses):
            return math.inf
        return statistics.fmean(self.losses)

    def text(self) -> str:
        if self.collapsed == len(self.losses):
            finite = [x for x in self.losses if math.isfinite(x)]
            return "diverged" if not finite else f"collapsed {min(finite):.2f}"
        if not math.isfinite(self.mean):
            cell = f"{sum(not math.isfinite(x) for x in self.losses)} diverged"
        elif len(self.losses) == 1:
            cell = f"{self.mean:.3f}"
        else:
            cell = f"{self.mean:.3f} [{min(self.losses):.3f}, {max(self.losses):.3f}]"
        return cell + (f" ({self.collapsed} coll.)" if self.collapsed else "")


Table = dict[tuple[str, str, float], Result]


def tabulate(runs: list[Run], collapse_at: dict[str, float]) -> Table:
    grouped: dict[tuple[str, str, float], list[tuple[int, float]]] = defaultdict(list)
    for run in runs:
        grouped[(run.cell, run.method, run.lr)].append((run.seed, run.final_loss))
    table = {}
    for key, pairs in grouped.items():
        seeds, losses = zip(*sorted(pairs), strict=True)
        collapsed = sum(not math.isfinite(x) or x >= collapse_at[key[0]] for x in losses)
        table[key] = Result(list(losses), collapsed, list(seeds))
    return table


def seed_spread(table: Table) -> str:
    """How far apart the seeds of one method at one rate end: the median and middle half of
    max - min over every result with 2+ seeds and no collapsed run (the noise a 0.03-nat limit
    is read against)."""
    spreads = [
        max(result.losses) - min(result.losses)
        for result in table.values()
        if len(result.losses) > 1 and result.collapsed == 0
    ]
    if len(spreads) < 2:
        return "too few results with 2+ seeds to measure it"
    low, median, high = statistics.quantiles(spreads, n=4)
    return (
        f"median {median:.3f} nats, middle half {low:.3f}-{high:.3f}, over {len(spreads)} "
        "results of 2+ seeds without a collapse"
    )


def methods_run(table: Table, cell: Cell) -> list[Method]:
    """The grid's methods for ``cell`` that have runs in ``table`` (a saved run may predate a
    method)."""
    return [m for m in methods_for(cell) if (cell.name, m.name, cell.lrs[0]) in table]


def tuned(table: Table, cell: Cell, lr: float) -> Result:
    """AdamW with its warmup tuned at this rate: the best mean among the tuned lengths."""
    return min((table[(cell.name, tuned_name(f), lr)] for f in TUNED_WARMUPS), key=lambda r: r.mean)


def best_adamw(table: Table, cell: Cell, lr: float) -> Result:
    """The better of AdamW without warmup and AdamW with the tuned warmup, at this rate."""
    return min(
        table[(cell.name, ADAMW_NO_WARMUP, lr)], tuned(table, cell, lr), key=lambda r: r.mean
    )


# Collapse counts differ by chance: at lr 0.1 in the short post-LN cells, the same update through
# two implementations (AdamW and AdaWarm, both with a 50-step warmup, 20 seeds) collapsed in 9 and
# 5 of 20 runs. A method collapses "more" than tuned AdamW where tuned AdamW never collapsed and it
# did, or where its count is higher by more than that chance explains at this significance.
COLLAPSE_SIGNIFICANCE = 0.05


def more_collapses_p(mine: Result, theirs: Result) -> float:
    """One-sided Fisher exact test: the chance, were both methods equally prone to collapse, of
    ``mine`` collapsing at least as often as it did given the total collapses of both."""
    total = mine.collapsed + theirs.collapsed
    runs = len(mine.losses) + len(theirs.losses)
    tail = sum(
        math.comb(len(mine.losses), k) * math.comb(len(theirs.losses), total - k)
        for k in range(mine.collapsed, min(total, len(mine.losses)) + 1)
    )
    return tail / math.comb(runs, total)


def collapses_more(mine: Result, theirs: Result) -> bool:
    """Whether ``mine`` collapses where ``theirs`` never does, or significantly more often."""
    if theirs.collapsed == 0:
        return mine.collapsed > 0
    return more_collapses_p(mine, theirs) < COLLAPSE_SIGNIFICANCE


def collapse_counts(mine: Result, theirs: Result) -> str:
    """``3 of 20 vs 1 of 20, p 0.30``: collapsed runs of a method and of tuned AdamW."""
    counts = f"{mine.collapsed} of {len(mine.losses)} vs {theirs.collapsed} of {len(theirs.losses)}"
    if theirs.collapsed == 0:
        return counts
    return f"{counts}, p {more_collapses_p(mine, theirs):.2f}"


# A cell judges the defaults only with this many seeds; with fewer it reports what it measured
# (one seed cannot tell a 0.03-nat gap from run-to-run noise).
SEEDS_TO_JUDGE = 2


@dataclass
class Verdict:
    cell: str
    promise: str
    passed: bool
    detail: str
    seeds: int

    def text(self) -> str:
        if self.seeds < SEEDS_TO_JUDGE:
            return f"{self.cell}: {self.promise}: no verdict from {self.seeds} seed ({self.detail})"
        return f"{self.cell}: {self.promise}: {'PASS' if self.passed else 'FAIL'} ({self.detail})"


def check_cell(table: Table, cell: Cell, default: str) -> list[Verdict]:
    """The promises of the defaults, measured in one cell."""
    mine = {lr: table[(cell.name, default, lr)] for lr in cell.lrs}
    if cell.schedule == USER_SCHEDULE:
        theirs = {lr: table[(cell.name, "AdamW", lr)] for lr in cell.lrs}
        fine = [lr for lr in cell.lrs if theirs[lr].collapsed == 0]
        gaps = {lr: mine[lr].mean - theirs[lr].mean for lr in fine}
        worst = max(gaps, key=gaps.get, default=None)
        return [
            Verdict(
                cell.name,
                "within 0.03 nats of AdamW under the same schedule",
                all(gap <= LIMIT for gap in gaps.values()),
                "no rate where AdamW trains"
                if worst is None
                else f"largest gap {gaps[worst]:+.3f} at lr {worst:g}",
                cell.seeds,
            )
        ]
    baseline = {lr: best_adamw(table, cell, lr) for lr in cell.lrs}
    best_lr = min(cell.lrs, key=lambda lr: baseline[lr].mean)
    gap = mine[best_lr].mean - baseline[best_lr].mean
    warmed = {lr: tuned(table, cell, lr) for lr in cell.lrs}
    collapsed = [lr for lr in cell.lrs if collapses_more(mine[lr], warmed[lr])]
    collapsing = [lr for lr in cell.lrs if mine[lr].collapsed]
    counts = "; ".join(
        f"lr {lr:g}: {collapse_counts(mine[lr], warmed[lr])}" for lr in (collapsed or collapsing)
    )
    return [
        Verdict(
            cell.name,
            "within 0.03 nats of the best AdamW at its best rate",
            gap <= LIMIT,
            f"lr {best_lr:g}: {mine[best_lr].mean:.3f} vs {baseline[best_lr].mean:.3f}, "
            f"gap {gap:+.3f}",
            cell.seeds,
        ),
        Verdict(
            cell.name,
            "no collapse where tuned AdamW has none, nor significantly more",
            not collapsed,
            f"collapses more: {counts}" if collapsed else (counts or "none"),
            cell.seeds,
        ),
    ]


# AdaWarmScheduleFree's promise: within this of the better schedulefree variant at every rate
# where that trains.
SCHEDULE_FREE_LIMIT = 0.01


def best_schedulefree(table: Table, cell: Cell, lr: float) -> Result:
    """The better of schedulefree's AdamWScheduleFree without warmup and with its 5 %."""
    return min(
        (table[(cell.name, name, lr)] for name in (SCHEDULE_FREE_NO_WARMUP, SCHEDULE_FREE)),
        key=lambda r: r.mean,
    )


def check_schedule_free_cell(table: Table, cell: Cell, default: str) -> list[Verdict]:
    """AdaWarmScheduleFree's promises in one cell: within SCHEDULE_FREE_LIMIT of the better
    schedulefree variant at every rate where that has no collapsed run, and no significantly
    more collapses than it at any rate."""
    mine = {lr: table[(cell.name, default, lr)] for lr in cell.lrs}
    theirs = {lr: best_schedulefree(table, cell, lr) for lr in cell.lrs}
    training = [lr for lr in cell.lrs if theirs[lr].collapsed == 0]
    gaps = {lr: mine[lr].mean - theirs[lr].mean for lr in training}
    worst = max(gaps, key=gaps.get, default=None)
    collapsed = [lr for lr in cell.lrs if collapses_more(mine[lr], theirs[lr])]
    collapsing = [lr for lr in cell.lrs if mine[lr].collapsed]
    counts = "; ".join(
        f"lr {lr:g}: {collapse_counts(mine[lr], theirs[lr])}" for lr in (collapsed or collapsing)
    )
    return [
        Verdict(
            cell.name,
            f"within {SCHEDULE_FREE_LIMIT} nats of the better schedulefree at every rate where "
            "it trains",
            all(gap <= SCHEDULE_FREE_LIMIT for gap in gaps.values()),
            "no rate where schedulefree trains"
            if worst is None
            else f"largest gap {gaps[worst]:+.3f} at lr {worst:g}",
            cell.seeds,
        ),
        Verdict(
            cell.name,
            "no collapse where the better schedulefree has none, nor significantly more",
            not collapsed,
            f"collapses more: {counts}" if collapsed else (counts or "none"),
            cell.seeds,
        ),
    ]


def paired_comparison(mine: Result, theirs: Result) -> PairedDifference | None:
    """The per-seed differences ``mine - theirs`` (the same seeds: the same initialisation and
    batches), with one-sided 95 % bounds."""
    return paired_difference(mine.by_seed, theirs.by_seed)


def paired_rows(
    table: Table, cells: list[Cell], default: str, free_default: str | None
) -> list[str]:
    """Per cell, the promises' comparisons by paired per-seed differences: the default against
    the best AdamW at that one's best rate (under the user's schedule: AdamW under it, at the
    rate where the difference's upper bound is highest) at ``LIMIT``, and AdaWarmScheduleFree's
    default against the better schedulefree at that one's best rate at ``SCHEDULE_FREE_LIMIT``."""
    rows = [
        "| cell | comparison | lr | difference [90 % interval] | margin | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(cell: Cell, what: str, lr: float, paired: PairedDifference | None, margin: float):
        verdict = "too few seeds" if paired is None else paired.verdict(margin)
        counts[what][verdict] += 1
        shown = "-" if paired is None else paired.text()
        rows.append(f"| {cell.name} | {what} | {lr:g} | {shown} | {margin:g} | {verdict} |")

    for cell in cells:
        mine = {lr: table[(cell.name, default, lr)] for lr in cell.lrs}
        if cell.schedule == USER_SCHEDULE:
            compared = {
                lr: paired_comparison(mine[lr], table[(cell.name, "AdamW", lr)])
                for lr in cell.lrs
                if table[(cell.name, "AdamW", lr)].collapsed == 0
            }
            decided = {lr: p for lr, p in compared.items() if p is not None}
            if compared:
                lr = max(decided, key=lambda r: decided[r].high) if decided else min(compared)
                add(cell, f"{default} - AdamW, same schedule", lr, compared[lr], LIMIT)
        else:
            baseline = {lr: best_adamw(table, cell, lr) for lr in cell.lrs}
            best_lr = min(cell.lrs, key=lambda lr: baseline[lr].mean)
            paired = paired_comparison(mine[best_lr], baseline[best_lr])
            add(cell, f"{default} - best AdamW", best_lr, paired, LIMIT)
        if free_default is not None and (cell.name, free_default, cell.lrs[0]) in table:
            theirs = {lr: best_schedulefree(table, cell, lr) for lr in cell.lrs}
            best_lr = min(cell.lrs, key=lambda lr: theirs[lr].mean)
            paired = paired_comparison(table[(cell.name, free_default, best_lr)], theirs[best_lr])
            add(cell, f"{free_default} - better schedulefree", best_lr, paired, SCHEDULE_FREE_LIMIT)
    tallies = []
    for what, by_verdict in counts.items():
        parts = ", ".join(f"{verdict} in {n}" for verdict, n in sorted(by_verdict.items()))
        tallies.append(f"- {what}: {parts} of {sum(by_verdict.values())} cells")
    return [*rows, "", *tallies]


def schedule_free_default(table: Table, cells: list[Cell]) -> str | None:
    """AdaWarmScheduleFree's default, if every cell has its runs and both schedulefree
    variants' (a saved grid may predate them)."""
    methods = [m for m in methods_for(cells[0]) if m.is_schedule_free_default]
    names = [*(m.name for m in methods), SCHEDULE_FREE_NO_WARMUP, SCHEDULE_FREE]
    measured = all(
        (cell.name, name, lr) in table for cell in cells for name in names for lr in cell.lrs
    )
    return methods[0].name if methods and measured else None


def same_update(cells: list[Cell], mine: str, theirs: str) -> bool:
    """Whether two schedule-free methods of the grid compute the same update in every cell:
    the same warmup length, neither rectified."""
    for cell in cells:
        methods = {m.name: m for m in methods_for(cell)}
        a, b = methods[mine], methods[theirs]
        if a.rectify or b.rectify or a.warmup_steps(cell) != b.warmup_steps(cell):
            return False
    return True


def schedule_free_candidates(table: Table, cells: list[Cell]) -> list[str]:
    """A table row per schedule-free method of the grid: how many of the cells' gap and
    collapse checks (check_schedule_free_cell) it passes."""
    lines = ["| method | gap checks passed | collapse checks passed |", "| --- | --- | --- |"]
    for method in methods_for(cells[0]):
        if not method.schedule_free:
            continue
        verdicts = [check_schedule_free_cell(table, cell, method.name) for cell in cells]
        gaps = sum(gap.passed for gap, _ in verdicts)
        collapses = sum(collapse.passed for _, collapse in verdicts)
        lines.append(f"| {method.name} | {gaps} of {len(cells)} | {collapses} of {len(cells)} |")
    return lines


def schedule_free_summary(table: Table, cells: list[Cell], default: str) -> list[str]:
    """One line per cell: the better schedulefree at its best rate, AdaWarmScheduleFree's
    default there and at its own best rate, and AdaWarm's default (AdamW with a schedule) at its
    best rate."""
    lines = [
        "| cell | better schedulefree (lr) | AdaWarmScheduleFree default, same lr | "
        "AdaWarmScheduleFree default at its best lr | AdaWarm default at its best lr |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cell in cells:
        free, free_lr = min((best_schedulefree(table, cell, lr).mean, lr) for lr in cell.lrs)
        mine = table[(cell.name, default, free_lr)]
        mine_best, mine_lr = best(table, cell, default)
        adawarm, adawarm_lr = best(table, cell, DEFAULT_NAME)
        lines.append(
            f"| {cell.name} | {free:.3f} ({free_lr:g}) | {mine.text()} ({mine.mean - free:+.3f})"
            f" | {mine_best:.3f} ({mine_lr:g}) | {adawarm:.3f} ({adawarm_lr:g}; "
            f"{adawarm - mine_best:+.3f} vs AdaWarmScheduleFree) |"
        )
    return lines


def best(table: Table, cell: Cell, method: str) -> tuple[float, float]:
    """(mean, lr) of a method at its best rate in a cell."""
    return min((table[(cell.name, method, lr)].mean, lr) for lr in cell.lrs)


def summary(table: Table, cells: list[Cell], default: str) -> list[str]:
    """One line per cell: the best AdamW, the default there, and schedule-free AdamW."""
    lines = [
        "| cell | best AdamW (lr) | AdaWarm default, same lr | default at its best lr | "
        "schedule-free AdamW at its best lr |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cell in cells:
        if cell.schedule == USER_SCHEDULE:
            adamw, adamw_lr = best(table, cell, "AdamW")
        else:
            adamw, adamw_lr = min((best_adamw(table, cell, lr).mean, lr) for lr in cell.lrs)
        mine = table[(cell.name, default, adamw_lr)]
        mine_best, mine_lr = best(table, cell, default)
        free, free_lr = best(table, cell, "schedule-free AdamW")
        lines.append(
            f"| {cell.name} | {adamw:.3f} ({adamw_lr:g}) | {mine.text()} "
            f"({mine.mean - adamw:+.3f}) | {mine_best:.3f} ({mine_lr:g}) | "
            f"{free:.3f} ({free_lr:g}; {free - mine_best:+.3f} vs default) |"
        )
    return lines


def gaps_table(table: Table, cells: list[Cell]) -> list[str]:
    """Every method of the cosine and constant cells against the best AdamW at its best rate:
    the gap in nats at that rate ("C" where it collapses more than tuned AdamW at some rate)."""
    cells = [cell for cell in cells if cell.schedule != USER_SCHEDULE]
    names = list(dict.fromkeys(m.name for cell in cells for m in methods_run(table, cell)))
    lines = [
        "| cell | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for cell in cells:
        best_lr = min(cell.lrs, key=lambda lr: best_adamw(table, cell, lr).mean)
        row = []
        for name in names:
            if (cell.name, name, best_lr) not in table:
                row.append("-")
                continue
            gap = table[(cell.name, name, best_lr)].mean - best_adamw(table, cell, best_lr).mean
            collapses = any(
                collapses_more(table[(cell.name, name, lr)], tuned(table, cell, lr))
                for lr in cell.lrs
            )
            row.append(f"{gap:+.3f}{' C' if collapses else ''}")
        lines.append(f"| {cell.name} | " + " | ".join(row) + " |")
    return lines


def cell_table(table: Table, cell: Cell) -> list[str]:
    header = "| method | " + " | ".join(f"lr {lr:g}" for lr in cell.lrs) + " |"
    lines = [
        f"#### {cell.name} ({cell.seeds} seeds)",
        "",
        header,
        "|" + " --- |" * (len(cell.lrs) + 1),
    ]
    for method in methods_run(table, cell):
        row = [table[(cell.name, method.name, lr)].text() for lr in cell.lrs]
        warmup = method.warmup_steps(cell) if method.warmup else 0
        label = f"**{method.name}**" if method.is_default else method.name
        lines.append(f"| {label} (W={warmup}) | " + " | ".join(row) + " |")
    return lines


def precision_report(table: Table, cell: Cell, default: str) -> tuple[list[str], list[Verdict]]:
    """The bf16-storage rows against the fp32 default, and the 0.02-nat promise for each row
    whose parameters keep small updates. Rows a saved grid did not run (it predates them) say
    so, with no verdict."""
    reference = table[(cell.name, default, PRECISION_LR)]
    rows = [
        f"bf16 storage ({cell.name}, lr {PRECISION_LR:g}; fp32 compute on upcast copies):",
        "",
        "| storage | final loss | vs fp32 |",
        "| --- | --- | --- |",
        f"| fp32 ({default}) | {reference.text()} | - |",
    ]
    verdicts = []
    for method in precision_methods():
        result = table.get((cell.name, method.name, PRECISION_LR))
        if result is None:
            rows.append(f"| {method.name} | not run in this grid | - |")
            continue
        gap = result.mean - reference.mean
        rows.append(f"| {method.name} | {result.text()} | {gap:+.3f} |")
        if keeps_small_updates(method):
            verdicts.append(
                Verdict(
                    cell.name,
                    f"{method.name} within {PRECISION_LIMIT} nats of fp32",
                    abs(gap) <= PRECISION_LIMIT,
                    f"{gap:+.3f}",
                    cell.seeds,
                )
            )
    return rows, verdicts


def run_grid(
    cells: list[Cell],
    workers: int,
    cache: Path,
    precise: Cell | None,
    reused: list[Run] = (),
) -> list[Run]:
    """Train every run of ``cells`` (and the bf16 rows in ``precise``) on ``workers``
    processes, except those in ``reused``: a saved grid's runs of the same cell, method, rate and
    seed, trained with the same settings (training is deterministic, so they are what a rerun
    would give; a run saved without its settings is trained again)."""
    jobs = [
        (cell, method, lr, seed, cache)
        for cell in cells
        for method in methods_for(cell)
        for lr in cell.lrs
        for seed in range(cell.seeds)
    ]
    if precise is not None:
        jobs += [
            (precise, method, PRECISION_LR, seed, cache)
            for method in precision_methods()
            for seed in range(precise.seeds)
        ]
    saved = {(run.cell, run.method, run.lr, run.seed, repr(run.settings)): run for run in reused}
    kept = [
        saved.get((cell.name, method.name, lr, seed, repr(method.settings(cell))))
        for cell, method, lr, seed, _ in jobs
    ]
    jobs = [job for job, run in zip(jobs, kept, strict=True) if run is None]
    jobs.sort(key=lambda job: -job[0].steps)  # long runs first: the pool ends together
    if any(cell.fine_tune for cell, *_ in jobs):
        pretrain(cache)
    return [run for run in kept if run is not None] + train_all(jobs, workers, "quality")


def documented_section(name: str, lines: list[str]) -> list[str]:
    """``lines`` between the markers of a named snippet section, which the documentation
    includes (pymdownx.snippets: ``--8<-- "bench/results/quality.md:NAME"``); HTML comments, so
    the report reads the same without them."""
    return [f"<!-- --8<-- [start:{name}] -->", *lines, f"<!-- --8<-- [end:{name}] -->"]


def report(
    cells: list[Cell], runs: list[Run], precise: Cell | None, heading: str
) -> tuple[str, list[Verdict], Table, dict[str, float]]:
    """The Markdown report of a grid's runs, the verdicts on the defaults, the table and the
    collapse threshold of each cell."""
    collapse_at = {
        cell.name: (fine_tuning() if cell.fine_tune else corpus()).unigram_entropy()
        for cell in cells
    }
    table = tabulate(runs, collapse_at)
    default = next(m.name for m in methods_for(cells[0]) if m.is_default)
    verdicts = [verdict for cell in cells for verdict in check_cell(table, cell, default)]
    text = [
        f"{heading} Text: byte-level LMs on the Python standard library "
        f"({corpus().description}); fine-tuning text: {fine_tuning().description}. Cells: mean "
        "[min, max] final validation loss over the seeds; (n coll.) counts collapsed runs; W is "
        f"the optimizer's own warmup in steps. Seed spread (max - min): {seed_spread(table)}.",
        "",
        "### Summary",
        "",
        *documented_section("summary", summary(table, cells, default)),
        "",
        "### Every method at the best AdamW's rate",
        "",
        "Gap in nats to the better of AdamW without warmup and AdamW with the tuned warmup, at "
        "the rate where that does best; C: collapses at a rate where tuned AdamW does not, or "
        "significantly more often than it (one-sided Fisher exact test, p < 0.05).",
        "",
        *gaps_table(table, cells),
        "",
        f"### The defaults ({default}) against their promises",
        "",
        *documented_section("checks", [f"- {verdict.text()}" for verdict in verdicts]),
    ]
    free_default = schedule_free_default(table, cells)
    if free_default is not None:
        free_verdicts = [
            verdict
            for cell in cells
            for verdict in check_schedule_free_cell(table, cell, free_default)
        ]
        verdicts += free_verdicts
        text += [
            "",
            f"### {free_default} against schedule-free AdamW",
            "",
            "The better of schedulefree's AdamWScheduleFree without warmup and with its 5 % "
            "warmup at its best rate, AdaWarmScheduleFree's default at that rate and at its own "
            "best, and AdaWarm's default (AdamW, under the cell's cosine) at its own best.",
            "",
            *documented_section(
                "schedule-free-summary", schedule_free_summary(table, cells, free_default)
            ),
            "",
            f"### {free_default} against its promises",
            "",
            *documented_section(
                "schedule-free-checks", [f"- {verdict.text()}" for verdict in free_verdicts]
            ),
            "",
            "### Every schedule-free method through the same checks",
            "",
            *(
                [
                    f"{SCHEDULE_FREE} (schedulefree's) computes the same update as {free_default} "
                    "in every cell: where the two differ is what the grid's noise alone does to a "
                    "check.",
                    "",
                ]
                if same_update(cells, free_default, SCHEDULE_FREE)
                else []
            ),
            *documented_section("schedule-free-candidates", schedule_free_candidates(table, cells)),
        ]
    text += [
        "",
        "### Paired per-seed comparisons",
        "",
        "Each method and its baseline ran on the same seeds (the same initialisation and "
        "batches): the difference is the method's final loss minus the baseline's, seed by "
        "seed; its interval is Student's t at 90 % (each bound a one-sided 95 % bound). "
        "Non-inferior: the upper bound is within the margin; worse: the lower bound is beyond "
        "it; undecided: neither -- the interval is wider than the margin, and more seeds would "
        "tell. These do not replace the checks above (which compare means), and they are read "
        "against the same runs.",
        "",
        *documented_section("paired", paired_rows(table, cells, default, free_default)),
    ]
    fallback = f"{DEFAULT_NAME} without total_steps"
    unhinted = [
        verdict
        for cell in cells
        if (cell.name, fallback, cell.lrs[0]) in table
        for verdict in check_cell(table, cell, fallback)
    ]
    if unhinted:
        text += ["", f"### {fallback}: the same checks", ""]
        text += [f"- {verdict.text()}" for verdict in unhinted]
    text += ["", "### Every cell"]
    for cell in cells:
        text += ["", *cell_table(table, cell)]
    if precise is not None:
        rows, precision_verdicts = precision_report(table, precise, default)
        verdicts += precision_verdicts
        text += ["", "### Low precision", "", *documented_section("low-precision", rows), ""]
        text += [f"- {verdict.text()}" for verdict in precision_verdicts]
    return "\n".join(text), verdicts, table, collapse_at


def load_runs(path: Path) -> tuple[list[Cell], list[Run], Cell | None, str]:
    """The cells, runs, bf16 cell and heading a full run saved in its JSON."""
    saved = json.loads(path.read_text())
    cells = [
        Cell(**{**fields, "lrs": tuple(fields["lrs"])})
        for fields in ({k: v for k, v in c.items() if k != "name"} for c in saved["cells"])
    ]
    runs = [Run(**{**r, "curve": [tuple(point) for point in r["curve"]]}) for r in saved["runs"]]
    precise = next((c for c in cells if c.name == saved["precision_cell"]), None)
    return cells, runs, precise, saved["heading"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two small cells, 1 seed (~1 min)")
    parser.add_argument(
        "--beta2", type=float, nargs="+", help="run every cell with these beta2 values instead"
    )
    parser.add_argument("--only", help="run only the cells whose name contains this text")
    parser.add_argument("--seeds", type=int, help="seeds per cell (default: the grid's)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes, 1 thread each"
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="train nothing: rebuild the report and plots from a run's quality.json",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        metavar="JSON",
        help="take the runs a saved quality.json already has (same cell, method, rate, seed and "
        "settings) from it, and train only the others",
    )
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    if args.report_from:
        cells, runs, precise, heading = load_runs(args.report_from)
    else:
        cells = quick_grid() if args.quick else full_grid()
        if args.beta2:
            cells = with_beta2(cells, args.beta2)
        if args.only:
            cells = [cell for cell in cells if args.only in cell.name]
        if args.seeds:
            cells = [replace(cell, seeds=args.seeds) for cell in cells]
        if not cells:
            parser.error("no cell of the grid matches")
        precise = None if args.quick else precision_cell(cells)
        start = time.perf_counter()
        reused = load_runs(args.reuse)[1] if args.reuse else []
        runs = run_grid(cells, args.workers, RUNS / "cache", precise, reused)
        heading = measured_heading(
            args.workers,
            len(runs),
            time.perf_counter() - start,
            " ".join(["python -m bench quality", *(argv or [])]),
        )
        if args.reuse:
            taken = len(
                {(r.cell, r.method, r.lr, r.seed, repr(r.settings)) for r in reused}
                & {(r.cell, r.method, r.lr, r.seed, repr(r.settings)) for r in runs}
            )
            heading += f" {taken} of the runs were taken from {args.reuse}, trained before."
    text, verdicts, table, collapse_at = report(cells, runs, precise, heading)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.report_from.stem if args.report_from else "quality" + "-quick" * args.quick
    (args.out / f"{stem}.md").write_text(text + "\n")
    saved = {
        "heading": heading,
        "cells": [asdict(cell) | {"name": cell.name} for cell in cells],
        "precision_cell": None if precise is None else precise.name,
        "collapse_at": collapse_at,
        "runs": [asdict(run) for run in runs],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(saved) + "\n")
    from bench.quality_plots import plot_results

    default = next(m.name for m in methods_for(cells[0]) if m.is_default)
    for path in plot_results(runs, table, cells, default, args.out, stem):
        print(f"wrote {path}")
    return {"report": text, "verdicts": verdicts, "table": table, "cells": cells}
