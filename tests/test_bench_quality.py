"""The quality grid's bookkeeping: methods, schedules, checks of the defaults, reports."""

from __future__ import annotations

import math

import pytest

from bench import grid, quality, training
from bench.grid import USER_SCHEDULE, Cell, Method
from bench.training import Run

COSINE = Cell("post-LN", 0.999, 100, "cosine", (0.01, 0.1), 2)
USER = Cell("post-LN", 0.999, 100, USER_SCHEDULE, (0.01, 0.1), 2)


@pytest.mark.parametrize("cell", [COSINE, USER], ids=["cosine", "user warmup"])
def test_every_cell_names_the_default_once_and_runs_schedule_free_adamw(cell):
    methods = grid.methods_for(cell)
    names = [m.name for m in methods]
    assert len(names) == len(set(names))
    assert sum(m.is_default for m in methods) == 1
    assert sum(m.is_schedule_free_default for m in methods) == 1
    assert {"schedule-free AdamW", "schedule-free AdamW no warmup"} <= set(names)


def test_warmups_resolve_per_cell():
    long = Cell("post-LN", 0.98, 3000, "cosine", (0.01,), 1)
    assert Method("w", "adamw", 0.05).warmup_steps(long) == 150
    assert Method("p", "adawarm", grid.PREVIOUS_RULE).warmup_steps(long) == 50
    assert Method("u", "adawarm", "untuned").warmup_steps(long) == 100
    assert Method("d", "adawarm", "auto").warmup_steps(COSINE) == 50


def test_the_schedulers_factor_carries_adamws_warmup_and_the_users_but_not_adawarms():
    constant = Cell("post-LN", 0.999, 100, "constant", (0.01,), 1)
    adamw = training.lr_multiplier(Method("w", "adamw", 0.1), constant)
    assert [adamw(s) for s in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    adawarm = training.lr_multiplier(Method("a", "adawarm", "auto"), COSINE)
    assert adawarm(0) == 1.0 and adawarm(50) == pytest.approx(0.5)  # cosine only
    user = training.lr_multiplier(Method("a", "adawarm", "auto"), USER)
    assert user(0) == 0.0 and user(5) == 0.5 and user(10) == 1.0  # HF's linear warmup
    free = training.lr_multiplier(Method("f", "schedulefree", 0.05), USER)
    assert {free(s) for s in range(100)} == {1.0}  # constant, as its authors intend


@pytest.mark.parametrize(
    "method",
    [
        Method("AdamW warmup", "adamw", 0.5),
        Method("AdaWarm default", "adawarm", "auto"),
        Method("schedule-free AdamW", "schedulefree", 0.5),
        Method("AdaWarmScheduleFree default", "adawarm-schedulefree", "auto"),
    ],
    ids=lambda m: m.kind,
)
@pytest.mark.parametrize("fine_tune", [False, True], ids=["from scratch", "fine-tune"])
def test_a_tiny_training_run_reports_a_finite_validation_loss(
    method, fine_tune, tmp_path, monkeypatch
):
    monkeypatch.setattr(training, "PRETRAIN_STEPS", 3)
    monkeypatch.setattr(training, "EVAL_BATCHES", 1)
    if fine_tune:
        training.pretrain(tmp_path)
    cell = Cell("pre-LN", 0.95, 6, USER_SCHEDULE, (1e-3,), 1, fine_tune=fine_tune)
    run = training.train_one((cell, method, 1e-3, 0, tmp_path))
    assert [step for step, _ in run.curve] == [1, 2, 3, 4, 5, 6]
    assert math.isfinite(run.final_loss) and run.final_loss == run.curve[-1][1]


def runs_of(cell: Cell, losses: dict[str, dict[float, list[float]]]) -> list[Run]:
    return [
        Run(cell.name, method, lr, seed, loss, [(1, loss)], 0.0)
        for method, by_lr in losses.items()
        for lr, values in by_lr.items()
        for seed, loss in enumerate(values)
    ]


def cosine_losses(default_at_best: list[float], default_at_high: list[float]):
    return {
        "AdamW no warmup": {0.01: [2.40, 2.42], 0.1: [3.2, math.nan]},
        "AdamW warmup 5%": {0.01: [2.45, 2.47], 0.1: [3.3, 3.4]},
        "AdamW warmup 20%": {0.01: [2.43, 2.45], 0.1: [2.9, 2.8]},
        "AdaWarm default": {0.01: default_at_best, 0.1: default_at_high},
    }


def test_collapses_are_counted_and_the_defaults_checked():
    table = quality.tabulate(
        runs_of(COSINE, cosine_losses([2.45, 2.46], [3.1, 2.7])), {COSINE.name: 3.0}
    )
    assert table[(COSINE.name, "AdamW no warmup", 0.1)].collapsed == 2
    assert table[(COSINE.name, "AdamW no warmup", 0.1)].text() == "collapsed 3.20"
    gap, collapse = quality.check_cell(table, COSINE, "AdaWarm default")
    assert not gap.passed and "gap +0.045" in gap.detail  # best: AdamW no warmup at 0.01
    assert not collapse.passed and collapse.detail == "collapses more: lr 0.1: 1 of 2 vs 0 of 2"

    table = quality.tabulate(
        runs_of(COSINE, cosine_losses([2.42, 2.43], [2.9, 2.7])), {COSINE.name: 3.0}
    )
    assert all(verdict.passed for verdict in quality.check_cell(table, COSINE, "AdaWarm default"))


def collapse_check(default_collapsed: int, tuned_collapsed: int, seeds: int = 20):
    """The collapse verdict at lr 0.1 with these counts of collapsed runs out of ``seeds``."""
    cell = Cell("post-LN", 0.999, 100, "cosine", (0.01, 0.1), seeds)

    def losses(collapsed: int) -> list[float]:
        return [3.2] * collapsed + [2.9] * (seeds - collapsed)

    by_method = {
        "AdamW no warmup": {0.01: [2.40] * seeds, 0.1: [3.2] * seeds},
        "AdamW warmup 5%": {0.01: [2.45] * seeds, 0.1: [3.3] * seeds},
        "AdamW warmup 20%": {0.01: [2.43] * seeds, 0.1: losses(tuned_collapsed)},
        "AdaWarm default": {0.01: [2.41] * seeds, 0.1: losses(default_collapsed)},
    }
    table = quality.tabulate(runs_of(cell, by_method), {cell.name: 3.0})
    _, collapse = quality.check_cell(table, cell, "AdaWarm default")
    return collapse


def test_the_paired_comparisons_take_each_seeds_difference_to_the_best_adamw():
    # AdaWarm default is 0.01 above AdamW no warmup (the best) on every seed: non-inferior at 0.03
    # however large the seeds' own spread; a constant 0.05 above is worse.
    losses = cosine_losses([2.41, 2.43], [3.1, 2.7])
    table = quality.tabulate(runs_of(COSINE, losses), {COSINE.name: 3.0})
    assert table[(COSINE.name, "AdaWarm default", 0.01)].by_seed == {0: 2.41, 1: 2.43}
    rows = quality.paired_rows(table, [COSINE], "AdaWarm default", None)
    assert "| 0.01 | +0.010 [+0.010, +0.010], 2 seeds | 0.03 | non-inferior |" in rows[2]
    losses["AdaWarm default"][0.01] = [2.45, 2.47]
    table = quality.tabulate(runs_of(COSINE, losses), {COSINE.name: 3.0})
    rows = quality.paired_rows(table, [COSINE], "AdaWarm default", None)
    assert rows[2].endswith("| worse |") and "worse in 1 of 1 cells" in rows[-1]


def test_collapsing_more_often_than_tuned_adamw_fails_only_beyond_chance():
    # one-sided Fisher exact test: P(>= 3 of the 4 collapses in the default's 20 of 40 runs)
    # = (C(20,3) C(20,1) + C(20,4)) / C(40,4) = 27645 / 91390
    passing = collapse_check(3, 1)
    assert passing.passed and passing.detail == "lr 0.1: 3 of 20 vs 1 of 20, p 0.30"
    assert quality.more_collapses_p(
        quality.Result([3.2] * 3 + [2.9] * 17, 3), quality.Result([3.2] + [2.9] * 19, 1)
    ) == pytest.approx(27645 / 91390)
    failing = collapse_check(8, 1)
    assert not failing.passed
    assert failing.detail.startswith("collapses more: lr 0.1: 8 of 20 vs 1 of 20, p 0.0")
    assert not collapse_check(1, 0).passed  # tuned AdamW never collapses: any collapse fails
    assert collapse_check(0, 0).detail == "none"


def test_the_seed_spread_leaves_out_collapsed_results_and_single_seeds():
    losses = {
        "AdamW no warmup": {0.01: [2.40, 2.42], 0.1: [3.2, 2.0]},  # collapsed: left out
        "AdamW warmup 5%": {0.01: [2.45, 2.49], 0.1: [2.7, 2.8]},
        "AdamW warmup 20%": {0.01: [2.43, 2.46]},
        "AdaWarm default": {0.01: [2.41]},  # one seed: left out
    }
    table = quality.tabulate(runs_of(COSINE, losses), {COSINE.name: 3.0})
    # spreads 0.02, 0.03, 0.04, 0.10; quartiles (exclusive method) 0.0225, 0.035, 0.085
    assert quality.seed_spread(table) == (
        "median 0.035 nats, middle half 0.022-0.085, over 4 results of 2+ seeds without a collapse"
    )


def test_under_the_users_warmup_the_default_is_held_to_adamw_at_every_rate_adamw_trains():
    losses = {
        "AdamW": {0.01: [2.40, 2.42], 0.1: [3.3, 3.4]},
        "AdaWarm default": {0.01: [2.46, 2.47], 0.1: [2.9, 2.9]},
    }
    table = quality.tabulate(runs_of(USER, losses), {USER.name: 3.0})
    (verdict,) = quality.check_cell(table, USER, "AdaWarm default")
    assert not verdict.passed and verdict.detail == "largest gap +0.055 at lr 0.01"


def test_precision_report_checks_the_compensated_rows_against_fp32():
    names = [m.name for m in grid.precision_methods()]
    lr = grid.PRECISION_LR
    assert names[3:] == [
        "AdaWarm default, bf16 moments",
        "AdaWarm default, bf16 params + Kahan + bf16 moments",
        "AdaWarm default, bf16 params + stochastic rounding + bf16 moments",
    ]
    losses = {
        "AdaWarm default": {lr: [2.40, 2.42]},
        names[0]: {lr: [2.50, 2.52]},  # plain bf16 parameters: shown, not promised
        names[1]: {lr: [2.41, 2.43]},
        names[2]: {lr: [2.44, 2.46]},
        names[3]: {lr: [2.42, 2.43]},
        names[4]: {lr: [2.39, 2.41]},
        # names[5] missing: a saved grid from before the row existed
    }
    table = quality.tabulate(runs_of(COSINE, losses), {COSINE.name: 3.0})
    rows, verdicts = quality.precision_report(table, COSINE, "AdaWarm default")
    assert len(rows) == 11 and rows[-1].endswith("| not run in this grid | - |")
    assert [verdict.passed for verdict in verdicts] == [True, False, True, True]


def schedule_free_check(default: dict[float, list[float]]):
    """AdaWarmScheduleFree's verdicts against schedulefree's two variants, which train at lr
    0.01 (the better: no warmup, 2.40) and collapse at 0.1 once in 20 runs (with its warmup)."""
    cell = Cell("post-LN", 0.999, 100, "cosine", (0.01, 0.1), 20)
    losses = {
        "schedule-free AdamW no warmup": {0.01: [2.40] * 20, 0.1: [3.2] * 20},
        "schedule-free AdamW": {0.01: [2.45] * 20, 0.1: [3.2] + [2.9] * 19},
        "AdaWarmScheduleFree default": default,
    }
    table = quality.tabulate(runs_of(cell, losses), {cell.name: 3.0})
    return quality.check_schedule_free_cell(table, cell, "AdaWarmScheduleFree default")


def test_adawarm_schedule_free_is_held_to_the_better_schedulefree_where_it_trains():
    gap, collapse = schedule_free_check({0.01: [2.405] * 20, 0.1: [2.0] * 20})
    assert gap.passed and gap.detail == "largest gap +0.005 at lr 0.01"  # 0.1 collapses: left out
    assert collapse.passed
    gap, _ = schedule_free_check({0.01: [2.42] * 20, 0.1: [2.0] * 20})
    assert not gap.passed and gap.detail == "largest gap +0.020 at lr 0.01"
    _, collapse = schedule_free_check({0.01: [2.40] * 20, 0.1: [3.2] * 8 + [2.9] * 12})
    assert not collapse.passed and collapse.detail.startswith("collapses more: lr 0.1: 8 of 20")


def test_every_schedule_free_method_goes_through_the_same_checks():
    cell = Cell("post-LN", 0.999, 100, "cosine", (0.01, 0.1), 20)
    names = [m.name for m in grid.methods_for(cell) if m.schedule_free]
    losses = {name: {0.01: [2.40] * 20, 0.1: [2.9] * 20} for name in names}
    losses["AdaWarmScheduleFree rectify only"] = {0.01: [2.50] * 20, 0.1: [3.2] * 20}
    table = quality.tabulate(runs_of(cell, losses), {cell.name: 3.0})
    rows = quality.schedule_free_candidates(table, [cell])
    assert len(rows) == 2 + len(names)
    assert "| AdaWarmScheduleFree default | 1 of 1 | 1 of 1 |" in rows
    assert "| AdaWarmScheduleFree rectify only | 0 of 1 | 0 of 1 |" in rows
    # schedulefree's 5 % warmup is the default's update when the run's length is known
    assert quality.same_update([cell], "AdaWarmScheduleFree default", "schedule-free AdamW")
    assert not quality.same_update(
        [cell], "AdaWarmScheduleFree default without total_steps", "schedule-free AdamW"
    )


def test_reused_runs_are_not_trained_again(monkeypatch, tmp_path):
    cell = Cell("post-LN", 0.999, 8, "cosine", (0.01,), 2)
    methods = grid.methods_for(cell)
    first = methods[0]
    second = next(m for m in methods if m.settings(cell) != first.settings(cell))
    reused = [
        Run(cell.name, first.name, 0.01, 1, 2.5, [(8, 2.5)], 0.0, first.settings(cell)),
        # same name, other settings (a default changed since): trained again
        Run(cell.name, second.name, 0.01, 1, 2.5, [(8, 2.5)], 0.0, first.settings(cell)),
        # saved before runs recorded their settings: trained again
        Run(cell.name, second.name, 0.01, 0, 2.5, [(8, 2.5)], 0.0),
    ]
    trained = []

    def train_all(jobs, workers, desc):
        trained.extend((job[1].name, job[3]) for job in jobs)
        return [Run(cell.name, job[1].name, job[2], job[3], 2.0, [], 0.0) for job in jobs]

    monkeypatch.setattr(quality, "train_all", train_all)
    runs = quality.run_grid([cell], 1, tmp_path, None, reused)
    assert (first.name, 1) not in trained and (first.name, 0) in trained
    assert (second.name, 1) in trained and (second.name, 0) in trained
    assert len(runs) == 2 * len(methods) and reused[0] in runs
    assert reused[1] not in runs and reused[2] not in runs


def test_the_grid_spans_what_the_defaults_must_hold_on():
    cells = grid.full_grid()
    assert {c.beta2 for c in cells} == {0.95, 0.98, 0.999}
    assert {c.architecture for c in cells} == {"post-LN", "pre-LN", "LSTM"}
    assert {300, 1000, 3000} <= {c.steps for c in cells}
    # issue 26: every rate up to 3x a cell's best AdamW rate (the LSTM's is 0.1)
    assert max(max(c.lrs) for c in cells if c.architecture == "LSTM") >= 0.3
    assert any(c.fine_tune for c in cells) and any(c.schedule == USER_SCHEDULE for c in cells)
    assert all(c.seeds >= 2 for c in cells)
    assert {c.beta2 for c in grid.with_beta2(cells, [0.9])} == {0.9}


def test_a_report_rebuilt_from_a_runs_json_is_the_same(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra: pip install -e '.[bench]'")
    cell = Cell("post-LN", 0.999, 8, "cosine", (0.01, 0.03), 1)
    runs = [
        training.train_one((cell, method, lr, 0, tmp_path))
        for method in grid.methods_for(cell)
        for lr in cell.lrs
    ]
    text, *_ = quality.report([cell], runs, None, "A test.")
    assert "### AdaWarmScheduleFree default against its promises" in text
    saved = tmp_path / "quality.json"
    saved.write_text(
        quality.json.dumps(
            {
                "heading": "A test.",
                "cells": [quality.asdict(cell)],
                "precision_cell": None,
                "runs": [quality.asdict(run) for run in runs],
            }
        )
    )
    result = quality.main(["--report-from", str(saved), "--out", str(tmp_path / "out")])
    assert result["report"] == text
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "quality-curves.png",
        "quality-loss-vs-lr.png",
    ]
