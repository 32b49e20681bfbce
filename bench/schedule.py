"""Plot AdaWarm's warmup multiplier (ramp x rectification) against the step, next to Ma &
Yarats' untuned linear and exponential warmups, for the given betas and warmup lengths."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from adawarm import warmup_factor
from adawarm.schedule import untuned_warmup_steps
from bench import RUNS


def curves(beta2: float, warmup_steps: int | str, steps: int) -> dict[str, list[float]]:
    """Multiplier per step 1..steps for AdaWarm's modes and the untuned references."""
    ts = range(1, steps + 1)
    untuned = untuned_warmup_steps(beta2)
    return {
        "AdaWarm rectify only (r_t)": [
            warmup_factor(t, beta2=beta2, warmup_steps=0, rectify=True) for t in ts
        ],
        f"AdaWarm ramp only (W={warmup_steps})": [
            warmup_factor(t, beta2=beta2, warmup_steps=warmup_steps, rectify=False) for t in ts
        ],
        f"AdaWarm ramp x rectify (W={warmup_steps})": [
            warmup_factor(t, beta2=beta2, warmup_steps=warmup_steps, rectify=True) for t in ts
        ],
        f"untuned linear, min(1, t / {untuned})": [min(1.0, t / untuned) for t in ts],
        "untuned exponential, 1 - exp(-(1 - beta2) t)": [
            1.0 - math.exp(-(1.0 - beta2) * t) for t in ts
        ],
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench schedule", description=__doc__)
    parser.add_argument("--beta2", type=float, nargs="+", default=[0.98, 0.999])
    parser.add_argument(
        "--warmup-steps", default="untuned", help='an int, or "untuned" for 2 / (1 - beta2)'
    )
    parser.add_argument("--steps", type=int, default=None, help="default: 3 / (1 - beta2)")
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    warmup = args.warmup_steps if args.warmup_steps == "untuned" else int(args.warmup_steps)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.beta2), figsize=(6 * len(args.beta2), 4), squeeze=False)
    for ax, beta2 in zip(axes[0], args.beta2, strict=True):
        steps = args.steps or round(3 / (1 - beta2))
        for label, values in curves(beta2, warmup, steps).items():
            # The untuned references are dashed: AdaWarm's ramp-only line lies under the linear one.
            style = "--" if label.startswith("untuned") else "-"
            ax.plot(range(1, steps + 1), values, style, label=label)
        ax.set_title(f"beta2 = {beta2}")
        ax.set_xlabel("step t")
        ax.set_ylabel("multiplier on the adaptive step")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "schedule.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path
