"""Per-tensor numbers of DTensor parameters summed over the ranks that hold their shards.

The measured warmup keeps, per tensor, sums over its elements (``relative_update``). A rank
holding a shard of a DTensor (FSDP2, tensor parallel) measures its shard only; summed over the
mesh dimensions the tensor is sharded on, every rank holds the whole tensor's sums -- the same
on every rank, whatever the sharding, so checkpoints resume on other shardings.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def sum_over_shards(values: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``values`` (one row per parameter, on any device) with each row summed over the ranks
    that hold shards of its parameter (a DTensor; other parameters' rows as they are). One
    all-reduce per mesh dimension the parameters are sharded on, of the rows sharded there."""
    from torch.distributed.tensor import DTensor, Shard

    rows: dict[tuple, list[int]] = defaultdict(list)
    for index, param in enumerate(params):
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            for dim, placement in enumerate(param.placements):
                if isinstance(placement, Shard):
                    rows[(mesh, dim)].append(index)
    summed = values.clone()
    for (mesh, dim), indices in rows.items():
        group = mesh.get_group(dim)
        # NCCL reduces device tensors only; gloo takes CPU ones.
        device = mesh.device_type if dist.get_backend(group) == "nccl" else "cpu"
        part = summed[indices].to(device)
        dist.all_reduce(part, group=group)
        summed[indices] = part.to(summed.device)
    return summed


def measured_sums_of_shards(entries: list[Tensor], scratch: list[Tensor], params) -> None:
    """After a step over sharded parameters: each tensor's ``relative_update`` entry becomes
    its whole tensor's sums, from the shards' sums the step wrote to ``scratch`` -- where the
    step measured it (a row still at its initial -1 on every rank, it did not: a skipped step,
    or one at rate 0, keeps the entry as it was). No host sync."""
    local = torch.stack([part.to(entries[0].device) for part in scratch])
    summed = sum_over_shards(local, params)
    current = torch.stack(entries)
    updated = torch.where(summed[:, :1] >= 0.0, summed.to(current.dtype), current)
    torch._foreach_copy_(entries, list(updated.unbind(0)))


def not_measured_like(entries: Sequence[Tensor]) -> list[Tensor]:
    """A scratch of ``entries``' shapes, dtypes and devices that a step writes its shards' sums
    to: ``(-1, 0)`` until a step measures the tensor."""
    return [torch.tensor([-1.0, 0.0], dtype=e.dtype, device=e.device) for e in entries]
