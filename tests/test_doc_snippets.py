"""Every ```python block of README.md and docs/ runs as written, with the stand-ins of
tests/doc_snippets.py for what a reader brings."""

from __future__ import annotations

import re

import pytest
from doc_snippets import snippets, stand_ins


@pytest.mark.parametrize(("code", "name"), snippets())
def test_the_block_runs_as_written(code, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace = {"__name__": f"snippet {name}", **stand_ins(code, tmp_path)}
    exec(compile(code, name, "exec"), namespace)


def test_every_document_with_code_has_its_blocks_collected():
    names = {param.id.split(":")[0] for param in snippets()}
    assert {"README.md", "docs/schedule-free.md", "docs/integrations.md"} <= names


def test_every_block_that_builds_a_schedule_free_optimizer_states_its_weight_decay():
    # Its default (0.01) differs from schedulefree's (0): a reader must see which one runs.
    for param in snippets():
        code, name = param.values
        for call in re.findall(r"AdaWarmScheduleFree\((.*?)\)\n", code, re.DOTALL):
            assert "weight_decay=" in call, name
