"""Plot the warmup multiplier on the adaptive step (ramp x rectification) against the step:
AdaWarm's default, the ``--warmup-steps`` you give (an int, "auto" or "untuned"), RAdam's
rectification, and Ma & Yarats' untuned linear and exponential warmups, for each beta2."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from adawarm import warmup_factor
from adawarm.optimizer import DEFAULT_RECTIFY, DEFAULT_WARMUP_STEPS
from adawarm.schedule import MEASURED, WARMUP_NAMES, resolve_warmup_steps, untuned_warmup_steps
from adawarm.validation import check_warmup_steps
from bench import RUNS

DEFAULT_LABEL = "AdaWarm default"


def warmup_steps_argument(text: str) -> int | str:
    """``--warmup-steps``: an int >= 0 or one of AdaWarm's names, checked like the optimizer
    checks it."""
    value: int | str = text if text in WARMUP_NAMES else _int_or_text(text)
    try:
        check_warmup_steps(value)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value == MEASURED:
        raise argparse.ArgumentTypeError(
            "Invalid warmup_steps: 'measured' is measured from a run's steps, not a curve of "
            "the step alone; python -m bench adaptive plots it"
        )
    return value


def _int_or_text(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def curves(beta2: float, warmup_steps: int | str, steps: int) -> dict[str, list[float]]:
    """Multiplier per step 1..steps: AdaWarm's default first, then the modes with
    ``warmup_steps`` and the untuned references (labels that do not depend on beta2)."""
    ts = range(1, steps + 1)
    untuned = untuned_warmup_steps(beta2)

    def adawarm(warmup: int | str, rectify: bool) -> list[float]:
        return [warmup_factor(t, beta2=beta2, warmup_steps=warmup, rectify=rectify) for t in ts]

    return {
        DEFAULT_LABEL: adawarm(DEFAULT_WARMUP_STEPS, DEFAULT_RECTIFY),
        f"AdaWarm ramp, warmup_steps={warmup_steps!r}": adawarm(warmup_steps, False),
        f"AdaWarm ramp x rectify, warmup_steps={warmup_steps!r}": adawarm(warmup_steps, True),
        "AdaWarm rectify only (r_t, RAdam)": adawarm(0, True),
        "untuned linear, min(1, t (1 - beta2) / 2)": [min(1.0, t / untuned) for t in ts],
        "untuned exponential, 1 - exp(-(1 - beta2) t)": [
            1.0 - math.exp(-(1.0 - beta2) * t) for t in ts
        ],
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench schedule", description=__doc__)
    parser.add_argument("--beta2", type=float, nargs="+", default=[0.95, 0.98, 0.999])
    parser.add_argument(
        "--warmup-steps",
        type=warmup_steps_argument,
        default="untuned",
        help='an int >= 0, "auto" (the default rule) or "untuned" (2 / (1 - beta2))',
    )
    parser.add_argument("--steps", type=int, default=None, help="default: 3 / (1 - beta2)")
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(args.beta2)
    fig, axes = plt.subplots(1, columns, figsize=(4.5 * columns + 3.5, 3.8), squeeze=False)
    for ax, beta2 in zip(axes[0], args.beta2, strict=True):
        steps = args.steps or round(3 / (1 - beta2))
        for index, (label, values) in enumerate(curves(beta2, args.warmup_steps, steps).items()):
            if label == DEFAULT_LABEL:
                style = {"color": "black", "linewidth": 2.5, "zorder": 5}
            else:  # the untuned references dashed: a ramp of the same length lies under them
                dashed = label.startswith("untuned")
                style = {"color": f"C{index}", "linestyle": "--" if dashed else "-"}
            ax.plot(range(1, steps + 1), values, label=label, **style)
        default_steps = resolve_warmup_steps(DEFAULT_WARMUP_STEPS, beta2)
        ax.axvspan(1, default_steps, color="black", alpha=0.08)
        ax.set_xscale("log")  # the default's tens of steps and 0.999's thousands, both visible
        chosen = resolve_warmup_steps(args.warmup_steps, beta2)
        ax.set_title(
            f"beta2 = {beta2}: default W = {default_steps} (shaded), "
            f"warmup_steps={args.warmup_steps!r} = {chosen}",
            fontsize=8,
        )
        ax.set_xlabel("step t")
        ax.set_ylabel("multiplier on the adaptive step")
        ax.set_ylim(0, 1.05)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 3.5 / (4.5 * columns + 3.5), 1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "schedule.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path
