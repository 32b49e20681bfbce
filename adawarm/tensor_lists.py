"""Helpers over the parallel lists (params, grads, states) that both backends split."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import TypeVar

Item = TypeVar("Item")

# Accessors for the per-step whole-list passes, e.g. ``set(map(DTYPE, params))``. Dynamo cannot
# call them on tensors, so code that torch.compile traces uses plain attribute access.
DTYPE = attrgetter("dtype")
IS_CPU = attrgetter("is_cpu")
IS_CUDA = attrgetter("is_cuda")


def select(items: Sequence[Item], indices: Sequence[int] | None) -> Sequence[Item]:
    """The entries at ``indices``, or ``items`` itself when ``indices`` is None (all of them)."""
    return items if indices is None else [items[i] for i in indices]
