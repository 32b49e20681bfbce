"""``python -m bench SUBCOMMAND``: AdaWarm's benchmarks."""

from __future__ import annotations

import argparse
import sys

from bench import quality, speed

SUBCOMMANDS = {"speed": speed.main, "quality": quality.main}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS))
    args, rest = parser.parse_known_args()
    SUBCOMMANDS[args.subcommand](rest)


if __name__ == "__main__":
    sys.exit(main())
