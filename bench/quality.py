"""Training quality: AdaWarm against AdamW (with and without warmup) and RAdam on a post-LN LM.

Every optimizer sees the same model initialisation and the same batches for a given seed. Over a
learning-rate grid that spans "all fine" to "everything diverges", with a cosine decay and with a
constant rate after warmup (so rectification is not credited merely for lowering the effective
rate), each run reports its final held-out validation loss. A run *collapses* when that loss is
non-finite or at or above the unigram entropy of the training bytes (the loss of a model that
learned byte frequencies only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adawarm import AdaWarm
from adawarm.optimizer import DEFAULT_RECTIFY, DEFAULT_WARMUP_STEPS
from bench import RUNS
from bench.lm import ModelConfig, PostLNTransformer, batches, loss_on, stdlib_corpus


@dataclass(frozen=True)
class Setting:
    """What the grid shares: model, data, length, betas."""

    steps: int = 240
    # Sized so the full grid fits 10 minutes on 2 cores (~11 ms a step on one core).
    batch_size: int = 12
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(d_model=32, n_layers=2, context=32)
    )
    beta1: float = 0.9
    # The original Transformer's beta2; its untuned warmup (2 / (1 - beta2) = 100 steps) fits
    # inside a CPU-sized run, where 0.999's 2000 steps would not.
    beta2: float = 0.98
    weight_decay: float = 0.01
    eval_every: int = 40
    eval_batches: int = 8


@dataclass(frozen=True)
class Method:
    """An optimizer configuration of the comparison."""

    name: str
    kind: str  # "adamw", "radam" or "adawarm"
    warmup_steps: int | str = 0  # AdamW: a LambdaLR ramp; AdaWarm: its built-in ramp
    rectify: bool = False
    param_dtype: str = "float32"  # "bfloat16": bf16 parameters, no fp32 master copy
    compensation: str | None = None


# Low precision is compared at one learning rate (the best of the grid for AdamW and AdaWarm's
# default) with the cosine schedule: bf16 parameters against the fp32 default.
PRECISION_LR = 1e-2
PRECISION_LIMIT = 0.02  # nats: the promise of issue 6


def precision_methods() -> list[Method]:
    base = ("adawarm", DEFAULT_WARMUP_STEPS, DEFAULT_RECTIFY, "bfloat16")
    return [
        Method("AdaWarm default, bf16 params", *base),
        Method("AdaWarm default, bf16 params + Kahan", *base, "kahan"),
        Method("AdaWarm default, bf16 params + stochastic rounding", *base, "stochastic"),
    ]


def methods(tuned_warmups: tuple[int, ...]) -> list[Method]:
    default = Method("AdaWarm default", "adawarm", DEFAULT_WARMUP_STEPS, DEFAULT_RECTIFY)
    modes = [
        Method("AdaWarm rectify only", "adawarm", 0, True),
        Method("AdaWarm ramp only", "adawarm", "untuned", False),
        Method("AdaWarm ramp x rectify", "adawarm", "untuned", True),
    ]
    listed = [
        Method("AdamW no warmup", "adamw"),
        *(Method(f"AdamW warmup {w}", "adamw", w) for w in tuned_warmups),
        Method("AdamW untuned warmup", "adamw", "untuned"),
        Method("torch RAdam", "radam"),
    ]
    # The default is one of the modes: run it once, under both names' meaning.
    same = [
        m for m in modes if (m.warmup_steps, m.rectify) == (default.warmup_steps, default.rectify)
    ]
    if same:
        modes = [
            Method(f"{m.name} (default)", m.kind, m.warmup_steps, m.rectify) if m in same else m
            for m in modes
        ]
    else:
        modes.insert(0, default)
    return listed + modes


@dataclass
class Run:
    method: str
    lr: float
    seed: int
    schedule: str
    final_loss: float
    curve: list[tuple[int, float]]
    seconds: float


def make_optimizer(method: Method, params, lr: float, setting: Setting):
    betas = (setting.beta1, setting.beta2)
    if method.kind == "adawarm":
        return AdaWarm(
            params,
            lr=lr,
            betas=betas,
            weight_decay=setting.weight_decay,
            warmup_steps=method.warmup_steps,
            rectify=method.rectify,
            compensation=method.compensation,
            backend="torch",
        )
    if method.kind == "radam":
        return torch.optim.RAdam(
            params,
            lr=lr,
            betas=betas,
            weight_decay=setting.weight_decay,
            decoupled_weight_decay=True,
        )
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=setting.weight_decay)


def lr_multiplier(method: Method, schedule: str, setting: Setting) -> Callable[[int], float]:
    """The LambdaLR factor for scheduler step ``s`` (optimizer step ``s + 1``): AdamW's ramp, if
    any, times the decay. AdaWarm's ramp is built in and multiplies this factor."""
    ramp_length = 0
    if method.kind == "adamw" and method.warmup_steps:
        ramp_length = (
            round(2 / (1 - setting.beta2))
            if method.warmup_steps == "untuned"
            else method.warmup_steps
        )

    def factor(s: int) -> float:
        ramp = min(1.0, (s + 1) / ramp_length) if ramp_length else 1.0
        if schedule == "constant":
            return ramp
        return ramp * 0.5 * (1.0 + math.cos(math.pi * min(s, setting.steps) / setting.steps))

    return factor


def train_one(job: tuple[Method, float, int, str, Setting]) -> Run:
    method, lr, seed, schedule, setting = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    corpus = stdlib_corpus()
    torch.manual_seed(seed)
    model = PostLNTransformer(setting.model).to(getattr(torch, method.param_dtype))
    optimizer = make_optimizer(method, model.parameters(), lr, setting)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(method, schedule, setting)
    )
    context = setting.model.context
    train_batches = batches(corpus.train, context, setting.batch_size, setting.steps, seed)
    eval_windows = batches(
        corpus.validation, context, setting.batch_size, setting.eval_batches, 10_000
    )

    def validation_loss() -> float:
        with torch.no_grad():
            return statistics.fmean(loss_on(model, windows).item() for windows in eval_windows)

    curve = []
    for step in range(setting.steps):
        loss = loss_on(model, train_batches[step])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % setting.eval_every == 0 or step + 1 == setting.steps:
            curve.append((step + 1, validation_loss()))
            if not math.isfinite(curve[-1][1]):
                break  # diverged: the remaining steps cannot recover
    final = curve[-1][1]
    return Run(method.name, lr, seed, schedule, final, curve, time.perf_counter() - start)


@dataclass
class Cell:
    method: str
    schedule: str
    lr: float
    losses: list[float]
    collapsed: int

    @property
    def mean(self) -> float:
        finite = [x for x in self.losses if math.isfinite(x)]
        return statistics.fmean(finite) if len(finite) == len(self.losses) else float("nan")


def cells(runs: list[Run], collapse_at: float) -> dict[tuple[str, str, float], Cell]:
    grouped: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for run in runs:
        grouped[(run.method, run.schedule, run.lr)].append(run.final_loss)
    return {
        key: Cell(*key, losses, sum(not math.isfinite(x) or x >= collapse_at for x in losses))
        for key, losses in grouped.items()
    }


def format_cell(cell: Cell) -> str:
    if cell.collapsed == len(cell.losses):
        finite = [x for x in cell.losses if math.isfinite(x)]
        return "diverged" if not finite else f"collapsed {min(finite):.2f}"
    text = f"{cell.mean:.3f} [{min(cell.losses):.3f}, {max(cell.losses):.3f}]"
    if not math.isfinite(cell.mean):
        text = "nan in " + str(len([x for x in cell.losses if not math.isfinite(x)]))
    return text + (f" ({cell.collapsed} coll.)" if cell.collapsed else "")


def summary_table(table: dict, method_names: list[str], lrs: list[float], schedule: str) -> str:
    header = "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
    lines = [header, "|" + " --- |" * (len(lrs) + 1)]
    for name in method_names:
        row = [format_cell(table[(name, schedule, lr)]) for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def tuned_cell(table, schedule: str, lr: float, warmups: tuple[int, ...]) -> Cell:
    """AdamW with its warmup length tuned per cell: the best mean among ``warmups``."""
    options = [table[(f"AdamW warmup {w}", schedule, lr)] for w in warmups]
    return min(options, key=lambda c: c.mean if math.isfinite(c.mean) else math.inf)


def check_default(table, default_name: str, lrs, schedules, warmups) -> list[str]:
    """The two promises the defaults must keep, measured on this grid."""
    verdicts = []
    for schedule in schedules:
        baseline_collapse_free = [
            lr for lr in lrs if tuned_cell(table, schedule, lr, warmups).collapsed == 0
        ]
        collapsed = [
            lr for lr in baseline_collapse_free if table[(default_name, schedule, lr)].collapsed
        ]
        verdicts.append(
            f"{schedule}: no collapse wherever tuned AdamW has none: "
            + ("PASS" if not collapsed else f"FAIL at lr {collapsed}")
        )
        candidates = [
            (cell.mean, lr)
            for lr in lrs
            for cell in (
                table[("AdamW no warmup", schedule, lr)],
                tuned_cell(table, schedule, lr, warmups),
            )
            if math.isfinite(cell.mean)
        ]
        best_loss, best_lr = min(candidates)
        mine = table[(default_name, schedule, best_lr)].mean
        gap = mine - best_loss
        verdicts.append(
            f"{schedule}: at the best lr {best_lr:g}, {default_name} {mine:.3f} vs best AdamW "
            f"{best_loss:.3f} (gap {gap:+.3f} nats, limit 0.03): "
            + ("PASS" if gap <= 0.03 else "FAIL")
        )
    return verdicts


def precision_report(table, default_name: str) -> tuple[list[str], list[str]]:
    """The low-precision rows against the fp32 default, and the 0.02-nat promise per row."""
    reference = table[(default_name, "cosine", PRECISION_LR)]
    rows = ["| parameters | final loss | vs fp32 |", "| --- | --- | --- |"]
    rows.append(f"| fp32 ({default_name}) | {format_cell(reference)} | - |")
    verdicts = []
    for method in precision_methods():
        cell = table[(method.name, "cosine", PRECISION_LR)]
        gap = cell.mean - reference.mean
        rows.append(f"| {method.name} | {format_cell(cell)} | {gap:+.3f} |")
        if method.compensation is not None:
            verdict = "PASS" if abs(gap) <= PRECISION_LIMIT else "FAIL"
            verdicts.append(
                f"{method.name}: {gap:+.3f} nats from fp32 (limit {PRECISION_LIMIT}): {verdict}"
            )
    return rows, verdicts


def _draw_loss_vs_lr(ax, schedule, runs, table, method_names, lrs, collapse_at) -> None:
    """Final loss against learning rate, seed mean with [min, max] bars; diverged drawn at top."""
    for name in method_names:
        finals = [
            [min(x, collapse_at + 1.0) if math.isfinite(x) else collapse_at + 1.0 for x in c.losses]
            for c in (table[(name, schedule, lr)] for lr in lrs)
        ]
        means = [statistics.fmean(f) for f in finals]
        low = [m - min(f) for m, f in zip(means, finals, strict=True)]
        high = [max(f) - m for m, f in zip(means, finals, strict=True)]
        ax.errorbar(lrs, means, yerr=[low, high], marker="o", capsize=3, label=name)
    ax.axhline(
        collapse_at,
        color="black",
        linestyle="--",
        linewidth=0.8,
        label="unigram entropy (collapse)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (nats/byte; diverged drawn at top)")
    ax.set_title(f"{schedule} schedule")


def _draw_curves(ax, schedule, runs, table, method_names, lrs, collapse_at) -> None:
    """Seed-mean validation curves at the best lr (solid) and the next-to-highest lr (dotted)."""

    def best_mean(lr: float) -> float:
        means = (table[(n, schedule, lr)].mean for n in method_names)
        return min((m for m in means if math.isfinite(m)), default=math.inf)

    second_highest = sorted(lrs)[-2] if len(lrs) > 1 else max(lrs)
    for lr, style in ((min(lrs, key=best_mean), "-"), (second_highest, ":")):
        for index, name in enumerate(method_names):
            curves = [r.curve for r in runs if (r.method, r.schedule, r.lr) == (name, schedule, lr)]
            shortest = min(len(c) for c in curves)
            points = list(zip(*[c[:shortest] for c in curves], strict=True))
            steps = [point[0][0] for point in points]
            mean = [statistics.fmean(p[1] for p in point) for point in points]
            ax.plot(steps, mean, style, color=f"C{index}", label=f"{name}, lr {lr:g}")
    ax.axhline(collapse_at, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylim(top=collapse_at + 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (seed mean)")
    ax.set_title(f"{schedule}: best lr (solid) and next-to-highest lr (dotted)")


def plot_results(
    runs: list[Run], table, method_names, lrs, schedules, collapse_at, out: Path, stem: str
) -> list[Path]:
    """The figures of a run, named after its stem (a quick run never replaces a full run's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figures = (
        (f"{stem}-loss-vs-lr.png", _draw_loss_vs_lr, 7),
        (f"{stem}-curves.png", _draw_curves, 6),
    )
    for filename, draw, legend_size in figures:
        fig, axes = plt.subplots(
            1, len(schedules), figsize=(6 * len(schedules), 4.5), squeeze=False
        )
        for ax, schedule in zip(axes[0], schedules, strict=True):
            draw(ax, schedule, runs, table, method_names, lrs, collapse_at)
        axes[0][0].legend(fontsize=legend_size)
        fig.tight_layout()
        paths.append(out / filename)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="2 learning rates, 1 seed, cosine only"
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--schedules", nargs="+", default=["cosine", "constant"], choices=["cosine", "constant"]
    )
    parser.add_argument("--steps", type=int, default=Setting.steps)
    parser.add_argument("--tuned-warmups", type=int, nargs="+", default=[20, 60])
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes, 1 thread each"
    )
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    from tqdm import tqdm

    lrs, seeds, schedules = args.lrs, list(range(args.seeds)), args.schedules
    if args.quick:
        lrs, seeds, schedules = [1e-2, 3e-2], [0], ["cosine"]
    setting = Setting(steps=args.steps if not args.quick else 160)
    warmups = tuple(args.tuned_warmups)
    method_list = methods(warmups)
    jobs = [
        (m, lr, seed, s, setting)
        for s in schedules
        for m in method_list
        for lr in lrs
        for seed in seeds
    ]
    precise = "cosine" in schedules and PRECISION_LR in lrs
    if precise:
        jobs += [
            (m, PRECISION_LR, seed, "cosine", setting)
            for m in precision_methods()
            for seed in seeds
        ]
    corpus = stdlib_corpus()
    collapse_at = corpus.unigram_entropy()
    start = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(args.workers) as pool:
        for run in tqdm(pool.map(train_one, jobs), total=len(jobs), desc="quality", unit="run"):
            runs.append(run)
    elapsed = time.perf_counter() - start
    table = cells(runs, collapse_at)
    names = [m.name for m in method_list]
    default_name = next(n for n in names if "default" in n)
    text = [
        f"Post-LN byte-level LM ({setting.model}), {setting.steps} steps, "
        f"batch {setting.batch_size}, "
        f"betas ({setting.beta1}, {setting.beta2}), weight decay {setting.weight_decay}; "
        f"data: {corpus.description}; collapse: final loss >= unigram entropy {collapse_at:.3f} "
        f"or non-finite. {len(seeds)} seed(s); cells: mean [min, max] final validation loss.",
        f"Machine: {platform.machine()}, {args.workers} processes x 1 thread; "
        f"torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}; {len(runs)} runs in {elapsed:.0f} s.",
    ]
    for schedule in schedules:
        text += ["", f"### {schedule} schedule", "", summary_table(table, names, lrs, schedule)]
    verdicts = check_default(table, default_name, lrs, schedules, warmups)
    if precise:
        rows, precision_verdicts = precision_report(table, default_name)
        text += ["", f"### bf16 parameters (cosine, lr {PRECISION_LR:g})", "", *rows]
        verdicts += precision_verdicts
    text += [
        "",
        f"Defaults ({default_name}) against their promises:",
        *[f"- {v}" for v in verdicts],
    ]
    report = "\n".join(text)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quality-quick" if args.quick else "quality"
    (args.out / f"{stem}.md").write_text(report + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps([asdict(r) for r in runs]) + "\n")
    for path in plot_results(runs, table, names, lrs, schedules, collapse_at, args.out, stem):
        print(f"wrote {path}")
    return {"report": report, "verdicts": verdicts}
