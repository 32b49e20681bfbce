"""The documentation: the README's links resolve, its tour runs in CI, the code points to pages
that exist, and the site (built with the docs extra) shows the generated results and the
docstrings' math."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text: lower case, punctuation other
    than hyphens and underscores dropped, each space a hyphen, repeats numbered."""
    seen: Counter[str] = Counter()
    anchors = set()
    for line in FENCE.sub("", markdown).splitlines():
        if match := re.match(r"^#{1,6} (.+)$", line):
            slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(FENCE.sub("", path.read_text()))
        if not re.match(r"^[a-z]+:", target)
    ]


def test_github_anchors_follow_githubs_rule():
    text = "# Drop-in for `torch.optim.AdamW`\n## Results at a glance\n## Tests\n## Tests\n"
    assert github_anchors(text) == {
        "drop-in-for-torchoptimadamw",
        "results-at-a-glance",
        "tests",
        "tests-1",
    }


@pytest.mark.parametrize("document", ["README.md", "CHANGELOG.md"])
def test_relative_links_and_anchors_resolve(document):
    source = ROOT / document
    links = relative_links(source)
    if document == "README.md":
        assert len(links) >= 10  # the parser found them: the README links every page
    for target in links:
        path_part, _, anchor = target.partition("#")
        path = (source.parent / path_part).resolve() if path_part else source
        assert path.exists(), f"{document}: {target} points to a missing file"
        if anchor:
            assert anchor in github_anchors(path.read_text()), f"{document}: no #{anchor}"


def documented_commands(path: str, name: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "documented_commands.py"), path, name],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


def test_the_readmes_tour_runs_in_ci_which_checks_its_plots_and_the_checkout():
    assert "python -m bench" in documented_commands("README.md", "tour")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "run_block README.md tour" in ci
    assert "bench/runs/tour/$plot.png" in ci and "git status --porcelain" in ci
    # the plots CI looks for are those the tour's parts write (bench/__main__.py)
    plots = ("speed-cpu-quick", "quality-quick-loss-vs-lr", "quality-quick-curves", "schedule")
    for plot in (*plots, "adaptive-factors"):
        assert plot in ci


def test_code_points_to_pages_that_exist_and_no_longer_to_readme_sections():
    sources = [
        path
        for folder in ("adawarm", "bench", "kernels", "tests", ".ci")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", "") and path.is_file()
    ] + [ROOT / "pyproject.toml"]
    pointers = []
    for path in sources:
        text = path.read_text()
        assert not re.search(r"README, \"", text), f"{path} points to a README section"
        pointers += [(path, page) for page in re.findall(r"docs/[\w-]+\.md", text)]
    assert pointers  # the code does point to pages
    for path, page in pointers:
        assert (ROOT / page).exists(), f"{path.relative_to(ROOT)} points to missing {page}"


REPORTS = ("quality.md", "speed-cpu.md", "collapse.md")


def mark_first_table_row(path: Path) -> str:
    """Append a mark to the first cell of the first table row of a report; the mark."""
    mark = f"MARK-{path.stem}"
    lines = path.read_text().splitlines(keepends=True)
    separator = next(i for i, line in enumerate(lines) if line.startswith(("| ---", "| ---:")))
    lines[separator + 1] = lines[separator + 1].replace(" |", f" {mark} |", 1)
    path.write_text("".join(lines))
    return mark


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, list[str]]:
    """The site built strictly from a copy of the sources whose reports carry marks, and the
    marks: a page that shows a mark includes the report at build time."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    source = tmp_path_factory.mktemp("source")
    for name in ("mkdocs.yml", "CHANGELOG.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("docs", "adawarm", "bench/results"):
        shutil.copytree(ROOT / folder, source / folder)
    marks = [mark_first_table_row(source / "bench" / "results" / name) for name in REPORTS]
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(source / "site")],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return source / "site", marks


def test_the_site_shows_the_committed_results_included_when_it_is_built(site):
    folder, marks = site
    benchmarks = (folder / "benchmarks" / "index.html").read_text()
    assert all(mark in benchmarks for mark in marks)
    for image in ("quality-loss-vs-lr.png", "speed-cpu.png"):
        assert (folder / "results" / image).exists()
        assert f'src="../results/{image}"' in benchmarks
    assert marks[0] in (folder / "results" / "quality" / "index.html").read_text()


def test_the_api_reference_renders_the_docstrings_math_and_signatures(site):
    api = (site[0] / "api" / "index.html").read_text()
    assert '<div class="arithmatex">' in api and r"\rho_\infty" in api
    for name in (
        "adawarm.AdaWarm",
        "adawarm.AdaWarm.step",
        "adawarm.adawarm",
        "adawarm.StepSchedule",
    ):
        assert f'id="{name}"' in api
    assert "Invalid" not in api and ":meth:" not in api and ":class:" not in api
