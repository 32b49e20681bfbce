"""Test set-up: Triton's interpreter when there is no GPU, and hypothesis profiles."""

import os
import sys
from pathlib import Path

import torch
from hypothesis import Phase, settings

# The interpreter must be chosen before triton is first imported; with a CUDA device the kernels
# run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository root holds bench/ (tested, not installed) and kernels/, which is installed as
# adawarm.kernels. On sys.path before site-packages (as pytest's `pythonpath` or `python -m
# pytest` would put it) kernels/ shadows the PyPI distribution `kernels`, which transformers >= 5
# imports: so the root goes last.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
sys.path.append(str(ROOT))

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("thorough", deadline=None, max_examples=300)
# For debugging a failure fast: no shrinking.
settings.register_profile("dev", deadline=None, max_examples=25, phases=[Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
