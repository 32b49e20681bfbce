"""End-to-end training speed on a GPT-2-124M-shaped model: one training step (forward, backward,
optimizer) in bf16 autocast, tokens per second, with torch.optim.AdamW(fused=True) and AdaWarm,
eagerly and replayed from a captured CUDA graph."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from adawarm import AdaWarm
from bench.graphs import WARMUP_CALLS, replayable
from bench.lm import Block, ModelConfig
from bench.speed import synchronize


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 50257
    context: int = 1024
    width: int = 768
    layers: int = 12
    heads: int = 12


class GPT(nn.Module):
    """GPT-2's shapes (pre-LN, tied embeddings): 124,439,808 parameters at the defaults."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.width)
        self.position = nn.Embedding(config.context, config.width)
        # The quality benchmark's pre-LN block at GPT-2's width, heads and context.
        shape = ModelConfig(config.width, config.layers, config.heads, config.context)
        self.blocks = nn.ModuleList(Block(shape, pre_norm=True) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # tied output embedding


@dataclass
class EndToEnd:
    optimizer: str
    graph: bool
    ms_per_step: float
    spread_ms: tuple[float, float]  # the middle half of the timed steps
    tokens_per_s: float


def _optimizers(device: torch.device, graph: bool) -> dict[str, Callable]:
    """The two optimizers; for a graph, capturable, with the rate as a device tensor."""

    def rate() -> float | torch.Tensor:
        return torch.tensor(3e-4, device=device) if graph else 3e-4

    def adamw(params):
        return torch.optim.AdamW(params, lr=rate(), fused=True, capturable=graph)

    def adawarm(params):
        # The Triton kernel: what backend=None picks for CUDA tensors, and what the rehearsal
        # runs under Triton's interpreter on a CPU.
        return AdaWarm(params, lr=rate(), capturable=graph, total_steps=1000, backend="triton")

    return {"torch AdamW fused": adamw, "AdaWarm": adawarm}


def measure(
    config: GPTConfig, batch: int, device: torch.device, steps: int, graph: bool
) -> list[EndToEnd]:
    """Time ``steps`` training steps per optimizer (after warm-up steps), eagerly or, with
    ``graph``, replayed from one captured CUDA graph of the whole step (on a CPU, the rehearsal,
    the same capturable step runs eagerly: :func:`bench.graphs.replayable`)."""
    results = []
    for name, make in _optimizers(device, graph).items():
        times = _step_times(make, config, batch, device, steps, graph)
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        median = statistics.median(times)
        spread = (quartiles[0] * 1e3, quartiles[2] * 1e3)
        results.append(EndToEnd(name, graph, median * 1e3, spread, batch * config.context / median))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _step_times(make, config: GPTConfig, batch: int, device, steps: int, graph: bool):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make(model.parameters())
    tokens = torch.randint(0, config.vocab, (batch, config.context + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        # A graph replays the addresses it captured: gradients are zeroed in place, and
        # autocast's cache of cast weights, which a replay would not refill, is off.
        optimizer.zero_grad(set_to_none=not graph)
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()

    if graph:
        run = replayable(step, device)
    else:
        run = step
        for _ in range(WARMUP_CALLS):
            run()
    times = []
    for _ in range(steps):
        synchronize(device)
        begin = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return times
