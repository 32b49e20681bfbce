"""Helpers over the parallel lists (params, grads, states) that both backends split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

Item = TypeVar("Item")


def select(items: Sequence[Item], indices: Sequence[int] | None) -> Sequence[Item]:
    """The entries at ``indices``, or ``items`` itself when ``indices`` is None (all of them)."""
    return items if indices is None else [items[i] for i in indices]
