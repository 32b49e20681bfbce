"""Worker processes for test_distributed.py: 2 ranks on localhost with the gloo backend.

Each worker trains the same small model on its half of a fixed batch and writes what it ends with
to ``out`` (rank 0), for the parent test to compare with one process on the whole batch.
"""

from __future__ import annotations

import faulthandler

import torch
import torch.distributed as dist
from torch import nn

from adawarm import AdaWarm, AdaWarmScheduleFree

STEPS = 14  # past t = 6, where rectification starts for beta2 = 0.999
OPTIMIZERS = {
    "adawarm": (AdaWarm, {"lr": 1e-2, "warmup_steps": 4, "rectify": True, "weight_decay": 0.05}),
    "schedule-free": (AdaWarmScheduleFree, {"lr": 1e-2, "warmup_steps": 4, "weight_decay": 0.05}),
}
# The measured warmup, at a rate it holds back.
MEASURED_OPTIMIZERS = {
    "adawarm measured": (AdaWarm, {"lr": 0.1, "warmup_steps": "measured", "weight_decay": 0.05}),
    "schedule-free measured": (
        AdaWarmScheduleFree,
        {"lr": 0.1, "warmup_steps": "measured", "weight_decay": 0.05},
    ),
}


# 8-bit moments for every tensor (the model's are small), blocked by each rank's shard.
EIGHT_BIT_OPTIMIZERS = {
    f"{kind} 8-bit": (cls, {**defaults, "state_dtype": torch.uint8, "min_8bit_size": 0})
    for kind, (cls, defaults) in OPTIMIZERS.items()
}


def make_optimizer(kind: str, params, **options) -> torch.optim.Optimizer:
    """The optimizer of ``kind``, ready to train (a schedule-free one in train mode)."""
    cls, defaults = {**OPTIMIZERS, **MEASURED_OPTIMIZERS, **EIGHT_BIT_OPTIMIZERS}[kind]
    optimizer = cls(params, **defaults, **options)
    if cls is AdaWarmScheduleFree:
        optimizer.train()
    return optimizer


def final_point(optimizer: torch.optim.Optimizer) -> None:
    """Put the parameters where a run is judged: a schedule-free optimizer's averaged point."""
    if isinstance(optimizer, AdaWarmScheduleFree):
        optimizer.eval()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


def full_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = full_batch(step)
    size = len(inputs) // world
    return inputs[rank * size : (rank + 1) * size], targets[rank * size : (rank + 1) * size]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int, world: int):
    for step in steps:
        inputs, targets = local_batch(step, rank, world)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def single_process_reference(kind: str, steps: int = STEPS) -> list[torch.Tensor]:
    model = make_model()
    optimizer = make_optimizer(kind, model.parameters())
    train(model, optimizer, range(steps), 0, 1)
    final_point(optimizer)
    return [p.detach().clone() for p in model.parameters()]


def _init(rank: int, world: int, port: int) -> None:
    faulthandler.enable(all_threads=True)  # a rank that aborts prints where its threads were
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}"
    )


def _finish() -> None:
    # Every rank's collectives are complete before any rank tears its process group down: a rank
    # that exits while gloo still runs work for the other was seen to abort ("terminate called
    # without an active exception", SIGABRT) or leave the other hanging, about one run in three
    # of this file on the 2-core CI machine.
    dist.barrier()
    dist.destroy_process_group()


def ddp_worker(rank: int, world: int, port: int, out: str, kind: str, backend: str) -> None:
    _init(rank, world, port)
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = make_optimizer(kind, model.parameters(), backend=backend)
    train(model, optimizer, range(STEPS), rank, world)
    final_point(optimizer)
    if rank == 0:
        torch.save([p.detach() for p in model.module.parameters()], out)
    _finish()


def _fully_sharded(world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_worker(rank: int, world: int, port: int, out: str, kind: str, backend: str) -> None:
    from torch.distributed.tensor import DTensor

    _init(rank, world, port)
    model = _fully_sharded(world)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = make_optimizer(kind, model.parameters(), backend=backend)
    # read on each rank alone, before any step (0 on a rectified first step)
    assert all(rate >= 0.0 for rate in optimizer.effective_lr())
    train(model, optimizer, range(STEPS), rank, world)
    check_blocks_within_shards(optimizer)
    final_point(optimizer)
    full = [p.full_tensor().detach() for p in model.parameters()]
    if rank == 0:
        torch.save(full, out)
    _finish()


def check_blocks_within_shards(optimizer: torch.optim.Optimizer) -> None:
    """Each 8-bit moment of a sharded parameter has the scales of its local shard's blocks."""
    from adawarm.quantization import block_count

    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if f"{key}_scales" in state:
                local = state[key].to_local()
                assert state[f"{key}_scales"].shape == (block_count(local.numel()),), key


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Save the model and optimizer with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_checkpoint_state(model, optimizer), checkpoint_id=directory)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load what :func:`save_checkpoint` saved into a new model and optimizer (a schedule-free
    optimizer in train mode: DCP initializes a fresh optimizer's state with a step at rate 0,
    which an eval-mode AdaWarmScheduleFree refuses, docs/schedule-free.md)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def checkpoint_worker(
    rank: int, world: int, port: int, out: str, kind: str, directory: str
) -> None:
    """Train 5 steps (mid-warmup), save with torch.distributed.checkpoint, train on; then
    rebuild from the checkpoint and train on again: both continuations must agree."""
    _init(rank, world, port)
    model = _fully_sharded(world)
    optimizer = make_optimizer(kind, model.parameters())
    train(model, optimizer, range(5), rank, world)
    save_checkpoint(model, optimizer, directory)
    train(model, optimizer, range(5, STEPS), rank, world)
    final_point(optimizer)
    uninterrupted = [p.full_tensor().detach() for p in model.parameters()]

    resumed_model = _fully_sharded(world)
    resumed_optimizer = make_optimizer(kind, resumed_model.parameters())
    load_checkpoint(resumed_model, resumed_optimizer, directory)
    train(resumed_model, resumed_optimizer, range(5, STEPS), rank, world)
    final_point(resumed_optimizer)
    resumed = [p.full_tensor().detach() for p in resumed_model.parameters()]
    steps = {float(s["step"]) for s in resumed_optimizer.state.values()}
    if rank == 0:
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "steps": steps}, out)
    _finish()


def whole(state: dict) -> dict:
    """Copies of a state's entries, DTensors gathered whole."""
    from torch.distributed.tensor import DTensor

    return {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).clone()
        for key, value in state.items()
    }


def reshard_save_worker(
    rank: int, world: int, port: int, out: str, kind: str, directory: str
) -> None:
    """Train 5 steps sharded over ``world`` ranks and save with torch.distributed.checkpoint;
    rank 0 also keeps every parameter's state as the checkpoint holds it (8-bit moments as their
    values), whole."""
    _init(rank, world, port)
    model = _fully_sharded(world)
    optimizer = make_optimizer(kind, model.parameters())
    train(model, optimizer, range(5), rank, world)
    save_checkpoint(model, optimizer, directory)
    saved = [whole(state) for state in optimizer.state_dict()["state"].values()]
    if rank == 0:
        torch.save(saved, out)
    _finish()


def reshard_load_worker(
    rank: int, world: int, port: int, out: str, kind: str, directory: str
) -> None:
    """Load the checkpoint of :func:`reshard_save_worker` sharded over ``world`` ranks (another
    count), and train on; rank 0 keeps the loaded states, whole, and the steps."""
    _init(rank, world, port)
    model = _fully_sharded(world)
    optimizer = make_optimizer(kind, model.parameters())
    load_checkpoint(model, optimizer, directory)
    loaded = [whole(optimizer.state[param]) for param in model.parameters()]
    check_blocks_within_shards(optimizer)
    train(model, optimizer, range(5, STEPS), rank, world)
    steps = {float(s["step"]) for s in optimizer.state.values()}
    if rank == 0:
        torch.save({"loaded": loaded, "steps": steps}, out)
    _finish()
