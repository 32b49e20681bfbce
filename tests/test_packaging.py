"""What a fresh install gets: a plain install needs torch only, and triton stays unimported until
the Triton backend is needed."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def requirements(extra: str | None) -> set[str]:
    """Names of the distributions that ``pip install adawarm[extra]`` installs on Linux (extra
    None: a plain install)."""
    names = set()
    environment = {"extra": extra or "", "platform_system": "Linux"}
    for line in requires("adawarm") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.add(requirement.name)
    return names


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=ROOT
    )


def test_a_plain_install_needs_torch_only():
    assert requirements(None) == {"torch"}


def test_the_test_extra_brings_what_the_interpreter_needs():
    assert {"triton", "numpy", "pytest", "hypothesis"} <= requirements("test") - requirements(None)


def test_import_adawarm_imports_neither_triton_nor_dynamo():
    result = run_python(
        "import sys, adawarm; print(sorted(m for m in ('triton', 'torch._dynamo') "
        "if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as if not installed: `import triton` raises ImportError
import torch, adawarm
param = torch.nn.Parameter(torch.ones(3))
param.grad = torch.ones(3)
adawarm.AdaWarm([param]).step()
print(float(param[0]) < 1.0)
try:
    adawarm.AdaWarm([param], backend="triton").step()
except RuntimeError as error:
    print(error)
"""


def test_without_triton_adawarm_trains_and_backend_triton_names_the_fix():
    result = run_python(WITHOUT_TRITON, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    stepped, message = result.stdout.strip().split("\n")
    assert stepped == "True"
    assert "triton is not installed" in message and "pip install triton" in message
    assert "backend='torch'" in message


def test_bare_pytest_collects_the_benchmark_tests():
    # `python -m pytest` puts the working directory on sys.path; the `pytest` command does not.
    pytest_command = Path(sys.executable).with_name("pytest")
    result = subprocess.run(
        [
            str(pytest_command),
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_bench.py",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_repository_root_comes_after_site_packages_on_the_test_path():
    # kernels/ at the root must not shadow the PyPI distribution `kernels` (transformers >= 5
    # imports it): tests/conftest.py puts the root last, whoever put it first.
    entries = [Path(entry or ".").resolve() for entry in sys.path]
    installed = [i for i, entry in enumerate(entries) if entry.name == "site-packages"]
    assert installed and entries.count(ROOT) == 1
    assert entries.index(ROOT) > max(installed)


def test_the_wheel_holds_the_kernels_inside_the_package_the_type_marker_and_the_license(tmp_path):
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("adawarm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "adawarm/py.typed" in names
    assert "adawarm/kernels/adawarm_step.py" in names
    assert not any(name.startswith("kernels/") for name in names)  # never a top-level `kernels`
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
