"""``python -m bench adaptive``: measured warmup rules -- the optimizers' own
(``warmup_steps="measured"``, :data:`SHIPPED`) and the prototypes tried before it.

A measured warmup scales each step's rate by a factor computed from what earlier steps did,
instead of from the step count alone. Before a rule goes into the optimizers (the Triton kernel
and the torch backend, with its statistic gathered inside the step), it is prototyped here:
AdaWarm or AdaWarmScheduleFree on the torch backend with no ramp of their own, whose group rates
are multiplied, step by step, by a factor that this module computes in Python from the tensors
before and after the previous step -- passes over the parameters that a fused form would not
make, so nothing here is timed. Each rule is trained on cells of the quality grid at the
cells' rates and seeds, and compared seed by seed (the same initialisation and batches) with
the runs of a saved ``quality.json``: AdaWarm with its default, the default without
``total_steps``, and the best fixed ramp at the same rate (the best mean of AdamW with none,
5 % and 20 % of the run, and AdaWarm with ``2 / (1 - beta2)`` steps); AdaWarmScheduleFree with
its default and with schedulefree's AdamWScheduleFree and its 5 % warmup.

The rules measure the **relative update** of a step, ``||delta p|| / ||p||``, the size of a step
against the weights it changes (Kosson et al. 2024, *Analyzing & reducing the need for learning
rate warmup in GPT training*): early Adam steps are large against the weights, which is what a
warmup damps. With ``rho`` the relative update the last step would have made at the group's
full rate (the measured one divided by the factor it applied), the next factor is
``min(1, cap / rho)``: a step may change its weights by at most ``cap`` of their norm. The
first step runs at the full rate (nothing is measured yet).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from adawarm import AdaWarm, AdaWarmScheduleFree
from adawarm.quantization import block_count, in_blocks
from adawarm.schedule import MEASURED
from bench import RUNS
from bench.grid import (
    ADAMW_NO_WARMUP,
    DEFAULT_NAME,
    SCHEDULE_FREE,
    SCHEDULE_FREE_DEFAULT,
    USER_SCHEDULE,
    Cell,
    Method,
    full_grid,
    methods_for,
    quick_grid,
)
from bench.paired import PairedDifference, paired_difference
from bench.quality import (
    Table,
    best_adamw,
    check_cell,
    check_schedule_free_cell,
    load_runs,
    tabulate,
)
from bench.training import Run, measured_heading, train_methods

# The fixed ramps a measured rule is compared with at each rate: the best of them by mean.
FIXED_RAMPS = (
    ADAMW_NO_WARMUP,
    "AdamW warmup 5%",
    "AdamW warmup 20%",
    "AdaWarm ramp 2/(1-beta2) (untuned)",
)
WITHOUT_LENGTH = f"{DEFAULT_NAME} without total_steps"
COMMITTED_GRID = Path(__file__).resolve().parent / "results" / "quality.json"
# issue 26's goals: at every rate up to RATE_RANGE times the cell's best AdamW rate, within a
# family's margin of its reference (AdaWarm: 0.03 of the best fixed ramp; AdaWarmScheduleFree:
# 0.01 of schedulefree with its 5 % warmup); at the best AdamW rate, non-inferior to today's
# default (told the run's length) at FREE_MARGIN
RATE_RANGE = 3.0
FREE_MARGIN = 0.01


@dataclass(frozen=True)
class Family:
    """The saved methods a rule is compared with: the default (told the run's length), the
    default without ``total_steps``, and the references, the best of which by mean at a rate
    (on the rule's seeds) is its bar there, at ``margin``."""

    default: str
    without_length: str
    references: tuple[str, ...]
    margin: float


FAMILIES = {
    "AdaWarm": Family(DEFAULT_NAME, WITHOUT_LENGTH, FIXED_RAMPS, 0.03),
    "AdaWarmScheduleFree": Family(
        SCHEDULE_FREE_DEFAULT,
        f"{SCHEDULE_FREE_DEFAULT} without total_steps",
        (SCHEDULE_FREE,),
        0.01,
    ),
}


@dataclass(frozen=True)
class Rule:
    """A measured warmup: the next factor is ``min(1, cap / rho)``, ``rho`` the relative update
    at the full rate, over the whole group (``per_tensor=False``) or each tensor (then a tensor
    of norm 0 takes the full rate, as LAMB's trust ratio); ``monotone``: a factor never falls
    (a ramp that ends), else it follows the measurement; ``rectify``: RAdam's rectification on
    top (AdaWarm's); ``predict_first``: the first step's factor from the relative update an Adam
    step makes when nothing has been measured -- every element with a gradient moves by the
    rate (``m_hat / sqrt(v_hat)`` is ``g / |g|``), so ``rho = lr sqrt(n) / ||p||`` over the
    group's ``n`` elements (else the first step runs at the full rate); ``align_gain``: a release
    driven by how each gradient lines up with the step before it, ``c = -g . dp / (||g|| ||dp||)``
    over the group (positive while the gradient still points the way the last step went,
    negative where that step overshot: the hypergradient of the loss in the rate, Baydin et al.
    2018, normalized) -- a second factor starts at the first step's and is multiplied by
    ``exp(align_gain (c - align_target))`` after each step (at most 1), and a step takes the
    larger of the two."""

    cap: float
    per_tensor: bool = False
    monotone: bool = False
    rectify: bool = False
    predict_first: bool = False
    align_gain: float = 0.0
    align_target: float = 0.0
    # the release reads the alignment of the step before (as a single-pass kernel must: the
    # alignment of a step's gradient is known only once the step has read all of it)
    lagged: bool = False
    # the release grows at most this much a step (0: no limit)
    max_growth: float = 0.0
    # lagged, and each step first scales the last one's move to the factor the release gives
    # it now that its alignment is known (the moments hold its direction: no extra pass)
    corrected: bool = False
    # the release per block of this many elements of each tensor (0: the group's): each block
    # reads its own alignment, which a single pass has before it updates the block (AdaWarm)
    block_size: int = 0


def _released_by_alignment(gain: float, target: float) -> str:
    """The name of the predicted cap of 0.005 released by alignment at ``gain`` above
    ``target`` (0.02, the first target tried, goes unnamed)."""
    above = "" if target == 0.02 else f" above {target:g}"
    return f"group cap 0.005, first step predicted, released by alignment {gain:g}{above}"


def _growth_name(growth: float) -> str:
    return f", at most x{growth:g} a step" if growth else ""


RULES = {
    "group cap 0.003 + rectification": Rule(0.003, rectify=True),
    "group cap 0.003 monotone + rectification": Rule(0.003, monotone=True, rectify=True),
    "group cap 0.002": Rule(0.002),
    "group cap 0.003": Rule(0.003),
    "group cap 0.005": Rule(0.005),
    "group cap 0.01": Rule(0.01),
    "group cap 0.005, first step predicted": Rule(0.005, predict_first=True),
    **{
        _released_by_alignment(gain, target): Rule(
            0.005, predict_first=True, align_gain=gain, align_target=target
        )
        for gain, target in (
            (2.0, 0.02),
            (0.5, 0.02),
            (1.0, 0.02),
            (2.0, 0.05),
            (3.0, 0.05),
            (2.0, 0.03),
        )
    },
    **{
        f"{_released_by_alignment(gain, 0.05)}, lagged{_growth_name(growth)}": Rule(
            0.005,
            predict_first=True,
            align_gain=gain,
            align_target=0.05,
            lagged=True,
            max_growth=growth,
        )
        for gain, growth in ((3.0, 0.0), (1.0, 0.0), (3.0, 1.5), (3.0, 1.2))
    },
    f"{_released_by_alignment(3.0, 0.05)}, lagged and corrected": Rule(
        0.005,
        predict_first=True,
        align_gain=3.0,
        align_target=0.05,
        lagged=True,
        corrected=True,
    ),
    **{
        f"{_released_by_alignment(gain, target)}, per block of 1024": Rule(
            0.005,
            predict_first=True,
            align_gain=gain,
            align_target=target,
            block_size=1024,
        )
        for gain, target in ((3.0, 0.05), (1.0, 0.05))
    },
    "tensor cap 0.003": Rule(0.003, per_tensor=True),
    "tensor cap 0.01": Rule(0.01, per_tensor=True),
}


# The rule as the optimizers ship it (warmup_steps="measured": the group cap 0.005 with its
# first step predicted, computed inside the step), run by the optimizers themselves.
SHIPPED = "warmup_steps='measured'"
CHOICES = (SHIPPED, *RULES)


class _MeasuredRate:
    """A rule's factor on each group's rate (a prototype: the measurement copies the measured
    tensors and makes a pass over them every step). ``_measured`` names what a step moves."""

    def _init_rule(self, rule: Rule) -> None:
        self.rule = rule
        self.factors: list[float | None] = [None] * len(self.param_groups)  # None: not measured
        self.released: list[float | None] = [None] * len(self.param_groups)  # align_gain's
        self.moves: list[list[Tensor] | None] = [None] * len(self.param_groups)
        self.alignments: list[float | None] = [None] * len(self.param_groups)  # lagged's
        # corrected's: the factor the last step applied and its cap's part
        self.last_steps: list[tuple[float, float] | None] = [None] * len(self.param_groups)
        # block_size's: per group, each tensor's release per block
        self.block_releases: list[list[Tensor] | None] = [None] * len(self.param_groups)

    def _measured(self, group: dict) -> list[Tensor]:
        raise NotImplementedError

    def step(self, closure=None):
        rates = [group["lr"] for group in self.param_groups]
        if self.rule.predict_first:
            for index, group in enumerate(self.param_groups):
                if self.factors[index] is None:
                    self.factors[index] = self.next_factor(None, self.first_rho(group))
        if self.rule.align_gain:
            for index, group in enumerate(self.param_groups):
                if self.rule.block_size:
                    self._release_blocks(index, group)
                else:
                    self._release(index, group)
        applied = [
            1.0 if self.rule.block_size else max(1.0 if factor is None else factor, released or 0.0)
            for factor, released in zip(self.factors, self.released, strict=True)
        ]
        if self.rule.corrected:
            for index, group in enumerate(self.param_groups):
                self._correct(index, group)
                cap = 1.0 if self.factors[index] is None else self.factors[index]
                self.last_steps[index] = (applied[index], cap)
        for group, factor in zip(self.param_groups, applied, strict=True):
            group["lr"] = group["lr"] * factor
        before = [[t.detach().clone() for t in self._measured(g)] for g in self.param_groups]
        try:
            loss = super().step(closure)
        finally:
            for group, rate in zip(self.param_groups, rates, strict=True):
                group["lr"] = rate
        for index, group in enumerate(self.param_groups):
            measured = self._measured(group)
            moved = relative_update(measured, before[index]) * self._share(group)
            if self.rule.block_size:  # the step ran at the full rate: each block takes its own
                self._scale_blocks(index, group, before[index])
            if self.rule.align_gain:
                self.moves[index] = [
                    t.detach() - b for t, b in zip(measured, before[index], strict=True)
                ]
            self.factors[index] = self.next_factor(
                self.factors[index], moved / max(applied[index], 1e-12)
            )
        return loss

    def _release(self, index: int, group: dict) -> None:
        """``align_gain``'s factor for the coming step, from its gradients and the last move."""
        if self.moves[index] is None:
            self.released[index] = self.factors[index]
            return
        dot = grad_squares = move_squares = 0.0
        for param, move in zip(group["params"], self.moves[index], strict=True):
            if param.grad is not None:
                dot += float((param.grad * move).sum())
                grad_squares += float(param.grad.square().sum())
                move_squares += float(move.square().sum())
        norms = math.sqrt(grad_squares * move_squares)
        alignment = -dot / norms if norms > 0.0 else 0.0
        if self.rule.lagged:
            alignment, self.alignments[index] = self.alignments[index], alignment
            if alignment is None:
                return
        growth = math.exp(self.rule.align_gain * (alignment - self.rule.align_target))
        if self.rule.max_growth:
            growth = min(growth, self.rule.max_growth)
        self.released[index] = min(1.0, (self.released[index] or 1.0) * growth)

    def _blocks(self, tensor: Tensor) -> Tensor:
        """``tensor``'s elements in rows of ``block_size`` (the last padded with zeros)."""
        return in_blocks(tensor.detach(), self.rule.block_size)

    def _release_blocks(self, index: int, group: dict) -> None:
        """``block_size``'s release of each block for the coming step, from its own alignment
        (the group's rate itself is not scaled: :meth:`_scale_blocks` scales each block's
        move after the step)."""
        params = group["params"]
        if self.moves[index] is None:
            first, size = self.factors[index], self.rule.block_size
            self.block_releases[index] = [
                torch.full((block_count(p.numel(), size),), first, dtype=torch.float64)
                for p in params
            ]
            return
        for param, move, released in zip(
            params, self.moves[index], self.block_releases[index], strict=True
        ):
            if param.grad is None:
                continue
            grads, moves = self._blocks(param.grad).double(), self._blocks(move).double()
            norms = (grads.square().sum(1) * moves.square().sum(1)).sqrt()
            alignment = -(grads * moves).sum(1) / norms.clamp_min(1e-300)
            growth = torch.exp(self.rule.align_gain * (alignment - self.rule.align_target))
            released.copy_(torch.where(norms > 0, (released * growth).clamp_max(1.0), released))

    def _scale_blocks(self, index: int, group: dict, before: list[Tensor]) -> None:
        """Scale each block's move, taken at the full rate, to the larger of the cap's factor and
        the block's release (a step is linear in its rate, decay included)."""
        cap = 1.0 if self.factors[index] is None else self.factors[index]
        for param, old, released in zip(
            group["params"], before, self.block_releases[index], strict=True
        ):
            factors = released.clamp_min(cap).to(param.dtype)
            move = self._blocks(param.detach() - old) * factors.unsqueeze(1)
            param.detach().copy_(old + move.reshape(-1)[: param.numel()].view_as(param))

    def _correct(self, index: int, group: dict) -> None:
        """``corrected``'s: scale the last move of the parameters to the factor the release
        now gives that step (``released`` is the release of the step before this one, lagged)."""
        if self.last_steps[index] is None or self.moves[index] is None:
            return
        applied, cap = self.last_steps[index]
        ratio = max(cap, self.released[index] or 0.0) / applied
        for param, move in zip(group["params"], self.moves[index], strict=True):
            param.detach().add_(move, alpha=ratio - 1.0)

    def _share(self, group: dict) -> float:
        """The share of the measured tensors' move that the parameters take."""
        return 1.0

    def first_rho(self, group: dict) -> float:
        """The relative update of a first Adam step at the group's full rate: every element
        moves by the rate, times the measured tensors' share."""
        tensors = self._measured(group)
        norm = math.sqrt(sum(float(t.detach().square().sum()) for t in tensors))
        count = sum(t.numel() for t in tensors)
        return group["lr"] * math.sqrt(count) / norm * self._share(group) if norm > 0 else 0.0

    def next_factor(self, previous: float | None, rho: float) -> float:
        """The factor of the next step after a step whose relative update at the full rate
        was ``rho``."""
        factor = min(1.0, self.rule.cap / rho) if rho > 0.0 else 1.0
        if self.rule.monotone and previous is not None:
            factor = max(factor, previous)
        return factor


def _groups(params, rule: Rule):
    """A group per tensor where the rule measures each tensor (a factor per tensor)."""
    return [{"params": [param]} for param in params] if rule.per_tensor else params


class MeasuredWarmup(_MeasuredRate, AdaWarm):
    """AdaWarm without a ramp, its rate scaled by a :class:`Rule`'s factor, measured on the
    parameters."""

    def __init__(self, params, rule: Rule, **options) -> None:
        super().__init__(_groups(params, rule), warmup_steps=0, rectify=rule.rectify, **options)
        self._init_rule(rule)

    def _measured(self, group: dict) -> list[Tensor]:
        return group["params"]


class MeasuredScheduleFree(_MeasuredRate, AdaWarmScheduleFree):
    """AdaWarmScheduleFree without a ramp, its rate (and so its averaging weights) scaled by a
    :class:`Rule`'s factor, measured on ``z``, which moves by the rate times the normalized
    gradient, times ``1 - beta1``: the share of that move the parameters ``y`` take (they also
    move by the average's pull, which the rate does not scale)."""

    def __init__(self, params, rule: Rule, **options) -> None:
        super().__init__(_groups(params, rule), warmup_steps=0, rectify=rule.rectify, **options)
        self._init_rule(rule)

    def _measured(self, group: dict) -> list[Tensor]:
        # before the first step z is the parameter (its state starts as a copy)
        return [self.state[param].get("z", param) for param in group["params"]]

    def _share(self, group: dict) -> float:
        # y = (1 - beta1) z + beta1 x: the gradients' point takes 1 - beta1 of z's move. z moves
        # by the rate times the normalized gradient itself (no momentum), several times the
        # size of Adam's momentum step: capped at the same share of its norm, the rate stayed
        # at a fraction of schedulefree's at every grid rate (0.1-0.5 nats behind).
        return 1.0 - group["betas"][0]


def relative_update(params: list[Tensor], before: list[Tensor]) -> float:
    """``||p - p_before|| / ||p_before||`` over these tensors together; 0 where the norm is 0."""
    moved = sum(float((p.detach() - b).square().sum()) for p, b in zip(params, before, strict=True))
    norm = sum(float(b.square().sum()) for b in before)
    return math.sqrt(moved / norm) if norm > 0.0 else 0.0


def make_measured(method: Method, params, lr: float, cell: Cell, **options) -> _MeasuredRate:
    """The optimizer of a method of kind ``"measured"`` or ``"measured-schedulefree"`` (its
    ``warmup`` names the rule)."""
    kind = MeasuredScheduleFree if method.schedule_free else MeasuredWarmup
    return kind(params, RULES[method.warmup], lr=lr, backend="torch", **options)


def measured_method(rule: str, schedule_free: bool = False) -> Method:
    if schedule_free:
        return Method(f"measured schedule-free: {rule}", "measured-schedulefree", rule)
    return Method(f"measured: {rule}", "measured", rule)


@dataclass(frozen=True)
class Comparison:
    """A rule at one rate of one cell, against the saved runs on the same seeds."""

    cell: str
    lr: float
    mean: float
    collapsed: int
    seeds: int
    against_default: PairedDifference | None
    against_no_length: PairedDifference | None
    best_fixed: str | None
    against_best_fixed: PairedDifference | None


def compare(
    runs: list[Run], saved: list[Run], collapse_at: dict[str, float], family: Family
) -> list[Comparison]:
    """Each (cell, rule, rate) of ``runs`` against the saved runs of the same cell and rate
    (``collapse_at``: per cell, the final loss at or above which a run collapsed)."""
    losses: dict[tuple[str, str, float], dict[int, float]] = {}
    for run in [*saved, *runs]:
        losses.setdefault((run.cell, run.method, run.lr), {})[run.seed] = run.final_loss
    rows = []
    for cell, method, lr in sorted({(r.cell, r.method, r.lr) for r in runs}):
        mine = losses[(cell, method, lr)]
        others = {
            name: losses.get((cell, name, lr), {})
            for name in {*family.references, family.default, family.without_length}
        }
        fixed = {name: _mean_on(others[name], mine) for name in family.references}
        best = min(fixed, key=fixed.get) if any(map(math.isfinite, fixed.values())) else None
        rows.append(
            Comparison(
                cell=cell,
                lr=lr,
                mean=_mean(list(mine.values())),
                # a cell the saved grid lacks has no threshold: only a diverged run counts
                collapsed=sum(not (x < collapse_at.get(cell, math.inf)) for x in mine.values()),
                seeds=len(mine),
                against_default=paired_difference(mine, others[family.default]),
                against_no_length=paired_difference(mine, others[family.without_length]),
                best_fixed=best,
                against_best_fixed=None if best is None else paired_difference(mine, others[best]),
            )
        )
    return rows


def _mean_on(theirs: dict[int, float], mine: dict[int, float]) -> float:
    """The mean of ``theirs`` over the seeds of ``mine``; infinite if one is missing."""
    if not all(seed in theirs for seed in mine):
        return math.inf
    return _mean([theirs[seed] for seed in mine])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if all(map(math.isfinite, values)) else math.inf


def best_adamw_rates(
    cells: list[Cell], saved: list[Run], collapse_at: dict[str, float]
) -> dict[str, float]:
    """Per cell of the saved grid, the rate where the better of AdamW without warmup and with
    its tuned warmup ends lowest (the quality report's baseline, ``quality.best_adamw``); none
    for the cells under the user's own schedule, which have no such AdamW."""
    table = tabulate(saved, collapse_at)
    return {
        cell.name: _best_adamw_rate(table, cell) for cell in cells if cell.schedule != USER_SCHEDULE
    }


def _best_adamw_rate(table: Table, cell: Cell) -> float:
    return min(cell.lrs, key=lambda lr: best_adamw(table, cell, lr).mean)


def report(
    rule: str, rows: list[Comparison], best_rates: dict[str, float], family: Family
) -> list[str]:
    """A rule's table and its standing on issue 26's rate and best-rate goals."""

    def shown(paired: PairedDifference | None) -> str:
        return "-" if paired is None else paired.text()

    lines = [
        f"### {rule}",
        "",
        f"| cell | lr | mean (coll.) | - {family.default} | - without total_steps | best "
        "reference | - best reference |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    rate_verdicts, free_verdicts = [], []
    for row in rows:
        collapsed = f" ({row.collapsed} coll.)" if row.collapsed else ""
        lines.append(
            f"| {row.cell} | {row.lr:g} | {row.mean:.3f}{collapsed} | "
            f"{shown(row.against_default)} | {shown(row.against_no_length)} | "
            f"{row.best_fixed or '-'} | {shown(row.against_best_fixed)} |"
        )
        best_rate = best_rates.get(row.cell)
        if best_rate is None:
            continue
        if row.lr <= RATE_RANGE * best_rate * (1 + 1e-9) and row.against_best_fixed is not None:
            rate_verdicts.append(row.against_best_fixed.verdict(family.margin))
        if row.lr == best_rate and row.against_default is not None:
            free_verdicts.append(row.against_default.verdict(FREE_MARGIN))
    lines += [
        "",
        f"- within {family.margin} nats of the best reference at each rate up to "
        f"{RATE_RANGE:g}x the cell's best AdamW rate: {_tally(rate_verdicts)}",
        f"- at the cell's best AdamW rate, against the default (told the run's length), margin "
        f"{FREE_MARGIN}: {_tally(free_verdicts)}",
    ]
    return lines


def default_checks(
    runs: list[Run],
    saved: list[Run],
    cells: list[Cell],
    collapse_at: dict[str, float],
    optimizer: str,
) -> list[str]:
    """The quality report's checks of ``optimizer``'s default (``bench.quality.check_cell``, or
    ``check_schedule_free_cell`` for AdaWarmScheduleFree) with the rule's runs in the default's
    place -- issue 26's anytime goal: needing no ``total_steps``, pass every check that the
    default, told the run's length, passes. Each cell of the saved grid that the rule ran at
    every rate is checked on the seeds both ran there (the first ``n``: the grid's seeds, or
    the rule's where it ran fewer), the default's checks on the same seeds."""
    family = FAMILIES[optimizer]
    check = check_schedule_free_cell if optimizer == "AdaWarmScheduleFree" else check_cell
    method = runs[0].method
    ran: dict[tuple[str, float], set[int]] = {}
    for run in runs:
        ran.setdefault((run.cell, run.lr), set()).add(run.seed)
    covered = []
    for cell in cells:
        seeds = [ran.get((cell.name, lr), set()) for lr in cell.lrs]
        missing = (n for n in range(cell.seeds) if not all(n in s for s in seeds))
        common = next(missing, cell.seeds)
        if common:
            covered.append(replace(cell, seeds=common))
    if not covered:
        return ["- the default's checks: no cell of the saved grid ran at its every rate"]
    seeds = {cell.name: cell.seeds for cell in covered}
    table = tabulate(
        [run for run in [*saved, *runs] if run.seed < seeds.get(run.cell, 0)], collapse_at
    )
    held, passed, failed, unchecked = 0, 0, [], []
    for cell in covered:
        try:
            pairs = zip(check(table, cell, family.default), check(table, cell, method), strict=True)
        except KeyError as missing:  # a saved grid without a method the checks compare with
            unchecked.append(f"{cell.name} (the saved grid has no {missing.args[0][1]!r})")
            continue
        for theirs, rule in pairs:
            passed += theirs.passed
            held += theirs.passed and rule.passed
            if theirs.passed and not rule.passed:
                failed.append(f"{cell.name}, {cell.seeds} seeds: {rule.promise} ({rule.detail})")
    return [
        f"- the default's checks with the rule in its place, in the {len(covered)} "
        f"cell{'' if len(covered) == 1 else 's'} it ran "
        f"at every rate (on the seeds both ran): passes {held} of the {passed} that "
        f"{family.default} passes",
        *(f"  - fails {text}" for text in failed),
        *(f"  - not checked: {text}" for text in unchecked),
    ]


def _tally(verdicts: list[str]) -> str:
    if not verdicts:
        return "nothing to compare"
    counts = {verdict: verdicts.count(verdict) for verdict in sorted(set(verdicts))}
    return ", ".join(f"{v} {n}" for v, n in counts.items()) + f" (of {len(verdicts)})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench adaptive", description=__doc__)
    parser.add_argument(
        "--rules",
        nargs="+",
        default=list(RULES),
        choices=list(CHOICES),
        metavar="RULE",
        help=f"the rules to train (default: every prototype): {'; '.join(CHOICES)} (the first "
        "is the optimizers' own, the others prototypes)",
    )
    parser.add_argument(
        "--only", action="append", help="cells whose name contains this text (repeatable)"
    )
    parser.add_argument("--seeds", type=int, help="at most this many seeds per cell")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["AdaWarm"],
        choices=list(FAMILIES),
        help="the optimizers the rules run in (default: AdaWarm)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the quick grid's cells (compared only with a --baseline that has them: "
        "python -m bench quality --quick writes one)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help=f"the saved quality grid whose runs the rules are compared with (default: "
        f"{COMMITTED_GRID}, or with --report-from the run's own)",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="train nothing: rebuild the report from a run's adaptive.json (and its baseline)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes, 1 thread each")
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    if args.report_from:
        saved_run = json.loads(args.report_from.read_text())
        heading = saved_run["heading"]
        baseline = args.baseline or Path(saved_run["baseline"])
        methods = [tuple(pair) for pair in saved_run["methods"]]
        runs = [Run(**run) for run in saved_run["runs"]]
    else:
        heading, baseline = None, args.baseline or COMMITTED_GRID
        methods = [(optimizer, rule) for optimizer in args.optimizers for rule in args.rules]
    saved_cells, saved, _, _ = load_runs(baseline)
    collapse_at = json.loads(baseline.read_text())["collapse_at"]
    if heading is None:
        cells = quick_grid() if args.quick else full_grid()
        if args.only:
            cells = [cell for cell in cells if any(text in cell.name for text in args.only)]
        if args.seeds:
            cells = [replace(cell, seeds=min(cell.seeds, args.seeds)) for cell in cells]
        if not cells:
            parser.error("no cell of the grid matches")
        start = time.perf_counter()
        pairs = [(cell, method_of(*pair)) for pair in methods for cell in cells]
        runs = train_methods(pairs, args.workers, "adaptive")
        heading = measured_heading(
            args.workers,
            len(runs),
            time.perf_counter() - start,
            " ".join(["python -m bench adaptive", shlex.join(argv or [])]).strip(),
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.report_from.stem if args.report_from else "adaptive"
    record = {
        "heading": heading,
        "baseline": _shown(baseline),
        "methods": methods,
        "runs": [asdict(run) for run in runs],
    }
    # saved before the report is built: the runs are the expensive part
    (args.out / f"{stem}.json").write_text(json.dumps(record) + "\n")
    best_rates = best_adamw_rates(saved_cells, saved, collapse_at)
    lines = [
        heading + f" Compared with {_shown(baseline)}, seed by seed: each difference is the "
        "rule's final validation loss minus the other's, the mean over the seeds with "
        "Student's t 90 % interval (each bound one-sided 95 %); the best reference is the best "
        f"mean on the same seeds among AdaWarm's fixed ramps ({', '.join(FIXED_RAMPS)}), or "
        f"{SCHEDULE_FREE} for AdaWarmScheduleFree.",
    ]
    for optimizer, rule in methods:
        name = method_of(optimizer, rule).name
        family = FAMILIES[optimizer]
        mine = [run for run in runs if run.method == name]
        rows = compare(mine, saved, collapse_at, family)
        lines += ["", *report(f"{optimizer}, {rule}", rows, best_rates, family)]
        lines += default_checks(mine, saved, saved_cells, collapse_at, optimizer)
    text = "\n".join(lines)
    print(text)
    (args.out / f"{stem}.md").write_text(text + "\n")
    plotted = plot_factors(runs, saved_cells, args.out / f"{stem}-factors.png")
    if plotted is not None:
        print(f"measured factors against the step: {_shown(plotted)}")
    return text


def method_of(optimizer: str, rule: str) -> Method:
    """The grid method of ``rule`` in ``optimizer`` (a key of :data:`FAMILIES`): the optimizer
    itself with ``warmup_steps="measured"`` for :data:`SHIPPED`, else a prototype."""
    if rule == SHIPPED:
        kind = "adawarm-schedulefree" if optimizer == "AdaWarmScheduleFree" else "adawarm"
        return Method(f"{optimizer} {SHIPPED}", kind, warmup=MEASURED)
    return measured_method(rule, schedule_free=optimizer == "AdaWarmScheduleFree")


# The cells whose measured factors the report plots, where a run has them: a post-LN cell that
# collapses at high rates without a long ramp, its 3000-step form, and the LSTM, which needs none.
PLOTTED_CELLS = (
    "post-LN, beta2 0.999, 300 steps, cosine",
    "post-LN, beta2 0.999, 3000 steps, cosine",
    "LSTM, beta2 0.999, 300 steps, cosine",
)


def plot_factors(runs: list[Run], cells: list[Cell], path: Path) -> Path | None:
    """Plot, per cell of :data:`PLOTTED_CELLS` (or the first cells, where none is among the
    runs) and optimizer, the measured factor of the first seed at each rate against the step,
    beside the fixed ramps of that cell (the default told the run's length, AdamW's 5 % and
    20 %, ``2 / (1 - beta2)``); None where no run recorded its factors."""
    measured = [run for run in runs if run.factors]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {cell.name: cell for cell in cells}
    names = [name for name in PLOTTED_CELLS if any(r.cell == name for r in measured)]
    names = names or sorted({run.cell for run in measured})[:3]
    optimizers = sorted({run.method for run in measured})
    fig, axes = plt.subplots(
        len(names), len(optimizers), figsize=(6 * len(optimizers), 3.6 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        cell = by_name[name]
        for column, method in enumerate(optimizers):
            axis = axes[row][column]
            shown = [r for r in measured if r.cell == name and r.method == method]
            first = min((r.seed for r in shown), default=0)
            for run in sorted((r for r in shown if r.seed == first), key=lambda r: r.lr):
                steps, factors = zip(*run.factors, strict=True)
                axis.plot(steps, factors, marker=".", label=f"measured, lr {run.lr:g}")
            for label, length in fixed_ramps(cell).items():
                steps = range(1, cell.steps + 1)
                axis.plot(steps, [min(1.0, t / length) for t in steps], "--", label=label)
            axis.set(xscale="log", ylim=(0, 1.05), xlabel="step", ylabel="factor on the rate")
            axis.set_title(f"{method}\n{name}", fontsize=9)
            axis.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fixed_ramps(cell: Cell) -> dict[str, int]:
    """The linear ramps a measured factor is drawn beside in ``cell``, by their lengths (none
    under the user's own warmup, for which the default's ramp steps aside)."""
    if cell.schedule == USER_SCHEDULE:
        return {}
    methods = {method.name: method for method in methods_for(cell)}
    lengths = {
        name: methods[name].warmup_steps(cell)
        for name in (DEFAULT_NAME, *FIXED_RAMPS)
        if name in methods  # the cells under the user's own schedule have other rows
    }
    return {f"{name} ({length} steps)": length for name, length in lengths.items() if length}


def _shown(path: Path) -> str:
    """``path`` as the report names it: relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)
