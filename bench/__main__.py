"""``python -m bench [speed|quality|schedule]``: AdaWarm against AdamW, on this machine.

Without a sub-command: a short tour -- a quick speed table and a quick quality run, a summary,
and PNG plots in bench/results/tour/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import quality, schedule, speed

SUBCOMMANDS = {"speed": speed.main, "quality": quality.main, "schedule": schedule.main}
TOUR_OUT = Path("bench/results/tour")


def tour() -> None:
    print("== speed (quick) ==")
    speed_rows = speed.main(["--quick", "--out", str(TOUR_OUT)])
    print("\n== quality (quick) ==")
    result = quality.main(["--quick", "--out", str(TOUR_OUT)])
    schedule.main(["--out", str(TOUR_OUT)])
    print("\n== summary ==")
    fused = next(r for r in speed_rows if r.optimizer == "torch AdamW fused")
    for row in speed_rows:
        ratio = row.median_ms / fused.median_ms
        print(f"speed: {row.optimizer:24} {row.median_ms:8.2f} ms  ({ratio:.2f}x fused AdamW)")
    for verdict in result["verdicts"]:
        print(f"quality: {verdict}")
    print(f"plots and tables: {TOUR_OUT}/")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("subcommand", nargs="?", choices=sorted(SUBCOMMANDS))
    args, rest = parser.parse_known_args()
    if args.subcommand is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        tour()
    else:
        SUBCOMMANDS[args.subcommand](rest)


if __name__ == "__main__":
    main()
