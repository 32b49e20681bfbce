"""The Python blocks of README.md and docs/, and the stand-ins they run with.

A block runs in a namespace of stand-ins for what a reader brings: a small CNN with BatchNorm
(``model``, ``params``), loaders of ``(inputs, targets)`` batches (``loader``, ``train_loader``,
``val_loader``; one batch as ``inputs``, ``targets``), ``loss_fn`` and ``num_training_steps``; a
block that continues a schedule-free run finds its ``optimizer``. A block that imports
transformers gets a tiny GPT-2 as ``model``, ``train_dataset``, ``eval_dataset`` and ``args``
(TrainingArguments of two steps); one that imports lightning needs the lightning extra. Everything
else it names it must import or define itself, as a reader's copy would.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import cpu_training_arguments, tiny_language_model

from adawarm import AdaWarmScheduleFree

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A fenced block, possibly indented (inside a list item).
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def snippets() -> list:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            code = textwrap.dedent(match.group(2))
            name = f"{document.relative_to(ROOT)}:{line}"
            found.append(pytest.param(code, name, id=name))
    return found


def torch_stand_ins() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )
    images = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(2))
    loader, val_loader = (
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
        for images, labels in ((images[:64], labels[:64]), (images[64:], labels[64:]))
    )
    inputs, targets = next(iter(loader))
    loss_fn = torch.nn.functional.cross_entropy
    # the optimizer of a schedule-free run in progress, for blocks that continue one
    optimizer = AdaWarmScheduleFree(model.parameters(), lr=1e-3, weight_decay=0.01)
    optimizer.train()
    loss_fn(model(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad()
    return {
        "model": model,
        "params": list(model.parameters()),
        "loader": loader,
        "train_loader": loader,
        "val_loader": val_loader,
        "inputs": inputs,
        "targets": targets,
        "loss_fn": loss_fn,
        "num_training_steps": len(loader) * 2,
        "optimizer": optimizer,
    }


def hugging_face_stand_ins(folder: Path) -> dict:
    transformers = pytest.importorskip(
        "transformers", reason="the hf extra: pip install -e '.[hf]'"
    )
    model, dataset = tiny_language_model(transformers, 16)
    args = cpu_training_arguments(
        transformers, folder, max_steps=2, per_device_train_batch_size=4, logging_steps=1
    )
    return {
        "model": model,
        "train_dataset": dataset,
        "eval_dataset": dataset[:4],
        "args": args,
        "num_training_steps": args.max_steps,
    }


def stand_ins(code: str, folder: Path) -> dict:
    if re.search(r"^(from|import) lightning", code, re.MULTILINE):
        pytest.importorskip(
            "lightning", reason="the lightning extra: pip install -e '.[lightning]'"
        )
    if re.search(r"^(from|import) transformers", code, re.MULTILINE):
        return hugging_face_stand_ins(folder)
    return torch_stand_ins()


def block_containing(document: str, text: str) -> str:
    """The one block of ``document`` (relative to the repository) that contains ``text``."""
    found = [
        p.values[0] for p in snippets() if p.id.startswith(f"{document}:") and text in p.values[0]
    ]
    assert len(found) == 1, f"{len(found)} blocks of {document} contain {text!r}"
    return found[0]
