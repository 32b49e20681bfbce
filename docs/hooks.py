"""MkDocs hook: the committed benchmark results become part of the site.

Every file under ``bench/results/`` is added under ``results/``: its Markdown reports as pages,
its plots, JSON and CSV as files the pages link to. Pages include parts of the reports with
``pymdownx.snippets``, so a rerun of a benchmark changes the site without a hand edit.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    bench = Path(config.config_file_path).parent / "bench"
    for path in sorted((bench / "results").rglob("*")):
        if path.is_file():
            files.append(
                File(
                    path.relative_to(bench).as_posix(),
                    src_dir=str(bench),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                )
            )
    return files
