"""``python -m bench memory``: bytes per parameter -- the parameters and every tensor of the
optimizer's state, as held after a step -- of each storage choice of both optimizers, beside
torch.optim.AdamW and the 8-bit optimizers of bitsandbytes and torchao where they install.

The model is GPT-2 small's parameter layout (``bench.speed``) at a quarter of its width and
vocabulary, so the small tensors that keep full-precision moments (biases and norms, under
``MIN_8BIT_SIZE`` elements) weigh as they do in a transformer. Every figure is counted from the
tensors themselves (``numel * element_size``; a tensor subclass, as torchao's low-bit states, by
the plain tensors it holds).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from adawarm import AdaWarm, AdaWarmScheduleFree
from bench import RUNS
from bench.peers import PEERS
from bench.speed import gpt2_small_shapes
from bench.training import measured_heading

# GPT-2 small's layout at a quarter of its width and of its vocabulary.
SHAPES = gpt2_small_shapes(d=192, vocab=12_564, context=1024, layers=12)
# issue 27's goal: bf16 parameters, stochastic rounding and 8-bit moments
GOAL = 4.1

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "8-bit": torch.uint8}
# per parameter dtype, the compensations that apply to it
COMPENSATIONS = {
    "fp32": (None,),
    "bf16": (None, "kahan", "stochastic"),
    "fp16": (None, "kahan"),
}


@dataclass(frozen=True)
class Row:
    optimizer: str
    params: str
    compensation: str
    state: str
    bytes_per_param: float


def storages(tensor: Tensor) -> Iterator[tuple[int, int]]:
    """(data pointer, bytes) of what ``tensor`` holds: its own elements, or, for a tensor
    subclass that wraps others (torchao's low-bit states), theirs."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (Tensor, torch.nn.Parameter):
        for name in flatten()[0]:
            yield from storages(getattr(tensor, name))
        return
    yield tensor.data_ptr(), tensor.numel() * tensor.element_size()


def state_tensors(state: dict) -> Iterator[Tensor]:
    for value in state.values():
        if isinstance(value, Tensor):
            yield value


def bytes_per_param(
    make: Callable[[list[Tensor]], torch.optim.Optimizer], dtype: torch.dtype
) -> float:
    """Parameters of ``SHAPES`` in ``dtype`` and ``make``'s state after one step, per element."""
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in SHAPES
    ]
    optimizer = make(params)
    if hasattr(optimizer, "train"):
        optimizer.train()
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(dtype)
    optimizer.step()
    held = {}  # each storage once: a table that tensors share (bitsandbytes' code maps) counts once
    for param in params:
        for tensor in (param, *state_tensors(optimizer.state[param])):
            held.update(storages(tensor))
    return sum(held.values()) / sum(param.numel() for param in params)


def ours() -> Iterator[tuple[Row, Callable, torch.dtype]]:
    for optimizer in (AdaWarm, AdaWarmScheduleFree):
        for param_name, dtype in PARAM_DTYPES.items():
            for compensation in COMPENSATIONS[param_name]:
                for state_name, state_dtype in STATE_DTYPES.items():
                    options = {"state_dtype": state_dtype, "compensation": compensation}

                    def make(params, optimizer=optimizer, options=options):
                        return optimizer(params, backend="torch", **options)

                    row = Row(optimizer.__name__, param_name, str(compensation), state_name, 0.0)
                    yield row, make, dtype


def peers() -> Iterator[tuple[Row, Callable, torch.dtype] | tuple[Row, str]]:
    """torch.optim.AdamW, and the low-bit AdamWs of bitsandbytes and torchao: each a measurable
    triple, or (row, why it was not measured)."""
    yield Row("torch.optim.AdamW", "fp32", "None", "fp32", 0.0), torch.optim.AdamW, torch.float32
    for peer in PEERS:
        row = Row(f"{peer.package} {peer.name}", "fp32", "None", peer.state, 0.0)
        try:
            make = peer.load()
            row = Row(peer.label(), "fp32", "None", peer.state, 0.0)
            bytes_per_param(make, torch.float32)  # does it step on this machine?
        except Exception as error:  # a peer that does not run here is reported, not raised
            yield row, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        yield row, make, torch.float32


def measure() -> tuple[list[Row], list[tuple[Row, str]]]:
    rows, missing = [], []
    for entry in (*ours(), *peers()):
        if len(entry) == 2:
            missing.append(entry)
            continue
        row, make, dtype = entry
        rows.append(Row(**{**row.__dict__, "bytes_per_param": bytes_per_param(make, dtype)}))
    return rows, missing


def report(rows: list[Row], missing: list[tuple[Row, str]], heading: str) -> list[str]:
    numel = sum(torch.Size(shape).numel() for shape in SHAPES)
    lines = [
        heading,
        "",
        f"{numel / 1e6:.1f}M parameters in {len(SHAPES)} tensors (GPT-2 small's layout at a "
        "quarter of its width and vocabulary); bytes per parameter of the parameters and every "
        "state tensor after one step, counted from the tensors.",
        "",
        "<!-- --8<-- [start:memory] -->",
        "| optimizer | parameters | compensation | state | bytes / parameter |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.optimizer} | {row.params} | {row.compensation} | {row.state} | "
            f"{row.bytes_per_param:.2f} |"
        )
    lines.append("<!-- --8<-- [end:memory] -->")
    goal = next(
        row
        for row in rows
        if (row.optimizer, row.params, row.compensation, row.state)
        == ("AdaWarm", "bf16", "stochastic", "8-bit")
    )
    verdict = "meets" if goal.bytes_per_param <= GOAL else "misses"
    lines += [
        "",
        f"AdaWarm with bf16 parameters, stochastic rounding and 8-bit moments: "
        f"{goal.bytes_per_param:.3f} bytes a parameter, which {verdict} the goal of {GOAL}.",
    ]
    if missing:
        lines += ["", "Not measured here:", ""]
        lines += [f"- {row.optimizer}: {why}" for row, why in missing]
    return lines


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, missing = measure()
    heading = measured_heading(1, len(rows), time.perf_counter() - start, "python -m bench memory")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"heading": heading, "rows": [row.__dict__ for row in rows]}
    (args.out / "memory.json").write_text(json.dumps(payload))
    text = "\n".join(report(rows, missing, heading))
    (args.out / "memory.md").write_text(text + "\n")
    print(text)
    return rows
