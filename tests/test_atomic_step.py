"""A Triton interpreter that cannot take effect is refused before anything changes (the other
all-or-nothing promises are in the promise matrix, tests/test_promises.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

INTERPRETER_TOO_LATE = """
import os, sys, torch
import triton  # imported, as torch.compile would, before the variable is set
os.environ["TRITON_INTERPRET"] = "1"
import adawarm
param = torch.nn.Parameter(torch.ones(5))
param.grad = torch.ones(5)
opt = getattr(adawarm, sys.argv[1])([param], backend="triton")
if hasattr(opt, "train"):
    opt.train()
try:
    opt.step()
except RuntimeError as error:
    print(error)
print(torch.equal(param.detach(), torch.ones(5)), dict(opt.state))
"""


@pytest.mark.parametrize("optimizer", ["AdaWarm", "AdaWarmScheduleFree"])
def test_an_interpreter_enabled_after_triton_was_imported_is_refused_before_any_change(optimizer):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_TOO_LATE, optimizer],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    message, unchanged = result.stdout.strip().split("\n")
    assert "TRITON_INTERPRET=1 was set after triton was imported" in message
    assert "before anything imports triton" in message
    assert unchanged == "True {}"
