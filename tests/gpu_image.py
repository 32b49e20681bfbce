"""A Python that sees only what the GPU image has, for running ``python -m bench gpu`` as it
runs there (with no network to install anything else).

The image has torch, triton, pytest, hypothesis, matplotlib, tqdm and numpy (with what they
need), pip and setuptools, and the project installed with ``pip install --no-deps -e .``. The
environment is a virtual environment without packages of its own, whose site-packages holds
links to exactly those distributions of this one -- their modules, their metadata and their
entry points (pytest loads plugins from entry points) -- and nothing else.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

GPU_IMAGE_DISTRIBUTIONS = (
    "torch",
    "triton",
    "pytest",
    "hypothesis",
    "matplotlib",
    "tqdm",
    "numpy",
    "pip",
    "setuptools",
    "adawarm",
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions() -> set[str]:
    """The GPU image's distributions installed here, with everything they require (no extras)."""
    found: set[str] = set()
    pending = list(GPU_IMAGE_DISTRIBUTIONS)
    while pending:
        name = _canonical(pending.pop())
        if name in found:
            continue
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: it cannot be imported here either
        found.add(name)
        for text in requirements:
            requirement = Requirement(text)
            marker = requirement.marker or Marker("python_version > '0'")
            if marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def python(folder: Path) -> Path:
    """The interpreter of a new virtual environment in ``folder`` with the GPU image's
    distributions, linked from this environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    target = Path(sysconfig.get_path("purelib", vars={"base": str(folder)}))
    wanted = image_distributions()
    for distribution in importlib.metadata.distributions():
        if _canonical(distribution.metadata["Name"]) not in wanted:
            continue
        site = Path(distribution.locate_file(""))
        # The top-level entries of its files: packages, modules, .pth files, its metadata.
        entries = {Path(file).parts[0] for file in distribution.files or ()}
        for entry in sorted(entries - {".."}):
            link = target / entry
            if not link.exists() and (site / entry).exists():
                link.symlink_to(site / entry)
    return folder / "bin" / "python"


def hidden_module() -> str | None:
    """A top-level module installed here whose distribution the GPU image lacks (None if every
    installed distribution is the image's): the image's environment must not import it."""
    wanted = image_distributions()
    for module, distributions in sorted(importlib.metadata.packages_distributions().items()):
        if (
            module.isidentifier()
            and not module.startswith("_")
            and not any(_canonical(d) in wanted for d in distributions)
        ):
            return module
    return None
