"""Helpers over the parallel lists (params, grads, states) that both backends split, and the
numbers their foreach ops take."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Hashable, Sequence
from operator import attrgetter
from typing import TypeVar

import torch
from torch import Tensor

Item = TypeVar("Item")
Key = TypeVar("Key", bound=Hashable)

# Accessors for the per-step whole-list passes, e.g. ``set(map(DTYPE, params))``. Dynamo cannot
# call them on tensors, so code that torch.compile traces uses plain attribute access.
DEVICE = attrgetter("device")
DTYPE = attrgetter("dtype")
IS_CPU = attrgetter("is_cpu")
IS_CUDA = attrgetter("is_cuda")


class PackedTensors(list):
    """Tensors (one per parameter) that are views, in order and end to end, of one contiguous
    1-D tensor, ``base``: an elementwise op on ``base`` is that op on each of them, in one call
    instead of one per tensor (~0.7 us a tensor on a CPU, what a small model's step is made of).
    Scalar counters packed so are read with one ``tolist()`` and set with one ``fill_`` (~1 us
    in all, where a counter costs ~0.16 us to read and ~0.5 us to set). Being a list of the
    views, it serves wherever a list of the tensors does; whoever builds one vouches that it
    holds ``base``'s views (see :func:`pack`)."""

    __slots__ = ("base",)

    def __init__(self, base: Tensor, shapes: Sequence[torch.Size]) -> None:
        sizes = [shape.numel() for shape in shapes]
        super().__init__(map(Tensor.view, base.split(sizes), shapes))
        self.base = base


def pack(tensors: Sequence[Tensor]) -> PackedTensors | None:
    """The values of these tensors as views of a new 1-D tensor, contiguous and in order (the
    caller puts the views in their places); None when they differ in dtype or device, or are
    none."""
    if not tensors or len({(t.dtype, t.device) for t in tensors}) != 1:
        return None
    return PackedTensors(torch.cat([t.reshape(-1) for t in tensors]), [t.shape for t in tensors])


def empty_packed(like: PackedTensors) -> PackedTensors:
    """A new, uninitialized :class:`PackedTensors` of the shapes, dtype and device of ``like``."""
    return PackedTensors(torch.empty_like(like.base), [t.shape for t in like])


def counter_values(counters: Sequence[Tensor]) -> list[float]:
    """The values of scalar counters, as Python numbers."""
    if isinstance(counters, PackedTensors):  # each view one element of base
        return counters.base.tolist()
    return list(map(Tensor.item, counters))


def set_all(lists: Sequence[Sequence[Tensor]], values: Sequence[float]) -> None:
    """Set the scalar tensors (counters) of each list, of one dtype and device per list, to
    that list's value: a :class:`PackedTensors` by one ``fill_``, the others by one foreach
    copy from one source tensor a list, ~0.5 us a tensor on a CPU, where
    ``torch._foreach_add_`` of a number or a ``fill_`` loop takes ~2 us a tensor."""
    targets, sources = [], []
    for tensors, value in zip(lists, values, strict=True):
        if isinstance(tensors, PackedTensors):
            tensors.base.fill_(value)
            continue
        targets += tensors
        first = tensors[0]
        sources += [torch.full((), value, dtype=first.dtype, device=first.device)] * len(tensors)
    if targets:
        torch._foreach_copy_(targets, sources)


def number_like(tensor: Tensor, value: float) -> Tensor:
    """``value`` as a 0-dim tensor of ``tensor``'s dtype and device, to pass to a foreach op: on
    a CPU a foreach op given a Python number wraps it into a tensor for each tensor of its list
    (``torch._foreach_mul_`` of 11 small tensors: ~21 us with a number, ~8 us with this)."""
    return torch.full((), value, dtype=tensor.dtype, device=tensor.device)


def add_number_(tensors: list[Tensor], value: Tensor) -> None:
    """Add the 0-dim tensor ``value`` to each of ``tensors``, in place: passed as a list of it,
    the fast form of a foreach add on a CPU (given the 0-dim tensor alone, ``_foreach_add_``
    takes as long as with a Python number)."""
    torch._foreach_add_(tensors, [value] * len(tensors))


def constant_like(tensor: Tensor, value: float) -> Tensor:
    """:func:`number_like` for a value that stays the same from step to step (a beta): made
    once per value, dtype and device (~0.2 us a call instead of ~1.3 us). The tensor is shared:
    foreach ops only read it."""
    return _constant(value, tensor.dtype, tensor.device)


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((), value, dtype=dtype, device=device)


def as_lists(lists: Sequence[Sequence[Item]]) -> list[list[Item]]:
    """Each of ``lists`` itself when a list (a :class:`PackedTensors` stays one), else a list of
    its items."""
    return [items if isinstance(items, list) else list(items) for items in lists]


def select_all(
    lists: Sequence[Sequence[Item]], indices: Sequence[int] | None
) -> list[Sequence[Item]]:
    """:func:`select` of each of ``lists``: the lists themselves when ``indices`` is None, the
    common case, at no call a list (a step pays for each call on cold caches)."""
    if indices is None:
        return list(lists)
    return [select(items, indices) for items in lists]


def select(items: Sequence[Item], indices: Sequence[int] | None) -> Sequence[Item]:
    """The entries at ``indices``, or ``items`` itself when ``indices`` is None (all of them)."""
    return items if indices is None else [items[i] for i in indices]


def indices_by_key(keys: list[Key]) -> list[tuple[Key, list[int] | None]]:
    """The distinct keys, in order of first appearance, and the positions that have each
    (``None``: all of them, the common case, found in one pass)."""
    if keys.count(keys[0]) == len(keys):
        return [(keys[0], None)]
    by_key: dict[Key, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        by_key[key].append(index)
    return list(by_key.items())
