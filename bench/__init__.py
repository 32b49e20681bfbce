"""AdaWarm's benchmarks: ``python -m bench`` from the repository root (see ``--help``)."""
