"""The quality grid's figures: final loss against learning rate, and validation curves at the
default's best rate, one panel per cell. AdaWarm's default is the thick black line, its warmup
phase is shaded, every method keeps one colour across panels, and the legend sits outside."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.grid import USER_SCHEDULE, USER_WARMUP, Cell, Method
from bench.quality import methods_run
from bench.training import Run

LEGEND_WIDTH = 3.2  # inches at the right of the figure


@dataclass(frozen=True)
class Look:
    colors: dict[str, str]  # per method name, the same in every panel
    top: float  # losses are drawn at most this high (diverged runs sit there)

    def style(self, method: Method) -> dict:
        if method.is_default:
            return {"color": "black", "linewidth": 2.5, "zorder": 5}
        return {"color": self.colors[method.name], "linewidth": 1.2}


def _loss_against_lr(ax, cell: Cell, runs: list[Run], table, default: str, look: Look) -> None:
    for method in methods_run(table, cell):
        results = [table[(cell.name, method.name, lr)] for lr in cell.lrs]
        means = [min(r.mean, look.top) for r in results]
        low = [m - min(min(r.losses), look.top) for m, r in zip(means, results, strict=True)]
        high = [min(max(r.losses), look.top) - m for m, r in zip(means, results, strict=True)]
        ax.errorbar(
            cell.lrs,
            means,
            yerr=[low, high],
            marker="o",
            capsize=2,
            label=method.name,
            **look.style(method),
        )
    ax.set_xscale("log")
    ax.set_title(cell.name, fontsize=8)
    ax.set_xlabel("learning rate", fontsize=8)
    ax.set_ylabel("final validation loss", fontsize=8)


def _curves_at_best_rate(ax, cell: Cell, runs: list[Run], table, default: str, look: Look) -> None:
    lr = min(cell.lrs, key=lambda rate: table[(cell.name, default, rate)].mean)
    for method in methods_run(table, cell):
        curves = [r.curve for r in runs if (r.cell, r.method, r.lr) == (cell.name, method.name, lr)]
        shortest = min(len(c) for c in curves)
        points = list(zip(*[c[:shortest] for c in curves], strict=True))
        steps = [point[0][0] for point in points]
        means = [min(statistics.fmean(p[1] for p in point), look.top) for point in points]
        ax.plot(steps, means, label=method.name, **look.style(method))
        if method.is_default and cell.schedule != USER_SCHEDULE:  # there it steps aside
            ax.axvspan(0, method.warmup_steps(cell), color="black", alpha=0.08)
    if cell.schedule == USER_SCHEDULE:
        ax.axvspan(0, round(USER_WARMUP * cell.steps), color="tab:blue", alpha=0.08)
    ax.set_title(f"{cell.name}, lr {lr:g}", fontsize=8)
    ax.set_xlabel("step (shaded: the warmup the default runs)", fontsize=8)
    ax.set_ylabel("validation loss, seed mean", fontsize=8)


def plot_results(runs: list[Run], table, cells: list[Cell], default: str, out: Path, stem: str):
    """The figures of a run, named after its stem (a quick run never replaces a full run's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = dict.fromkeys(
        m.name for cell in cells for m in methods_run(table, cell) if not m.is_default
    )
    look = Look(
        colors={name: f"C{index % 10}" for index, name in enumerate(names)},
        top=max(r.final_loss for r in runs if math.isfinite(r.final_loss)) + 0.1,
    )
    columns = min(4, len(cells))
    rows = math.ceil(len(cells) / columns)
    paths = []
    for suffix, draw in (("loss-vs-lr", _loss_against_lr), ("curves", _curves_at_best_rate)):
        size = (4.2 * columns + LEGEND_WIDTH, 3.3 * rows)
        fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
        for ax in axes.flat[len(cells) :]:
            ax.set_visible(False)
        for ax, cell in zip(axes.flat, cells, strict=False):
            draw(ax, cell, runs, table, default, look)
            ax.tick_params(labelsize=7)
        handles: dict[str, object] = {}
        for ax in axes.flat[: len(cells)]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 1 - LEGEND_WIDTH / size[0], 1))
        paths.append(out / f"{stem}-{suffix}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
