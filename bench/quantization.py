"""``python -m bench quantization``: how far 8-bit moments (``adawarm.quantization``) are from
the fp32 moments of real training runs, by block size and by how the second moment is coded.

Each of the quality grid's models (pre-LN, post-LN, LSTM) trains with AdaWarm's defaults (fp32
moments, lr 0.01, beta2 0.999, its data); at a few steps its moments are stored in 8 bits and
read back -- each tensor of at least ``MIN_8BIT_SIZE`` elements, as the optimizer would -- and
compared with themselves: the relative L2 error, over those tensors together, of the first
moment, of the second moment's square root, and of the update they give, ``m_hat /
(sqrt(v_hat) + eps)``, to the nearest code and by one stochastic store. Nothing trains on the
stored moments here; this measures one store's error, which the block size and the maps decide.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from adawarm import AdaWarm
from adawarm.quantization import (
    FIRST_MOMENT,
    MIN_8BIT_SIZE,
    SECOND_MOMENT,
    Code,
    dequantize,
    quantize,
)
from adawarm.rounding import random_bits
from bench import RUNS
from bench.lm import batches, loss_on, make_model
from bench.training import BATCH_SIZE, BETA1, MODEL, WEIGHT_DECAY, corpus, measured_heading

ARCHITECTURES = ("pre-LN", "post-LN", "LSTM")
LR, BETA2, EPS = 0.01, 0.999, 1e-8
SNAPSHOTS = (10, 100, 1000)
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048)
# The second moment coded as it is, on the same unsigned map, against its square root.
SECOND_MOMENT_ITSELF = Code("unsigned dynamic of v itself", SECOND_MOMENT.table, False)
SECOND_MOMENT_CODES = {"sqrt(v)": SECOND_MOMENT, "v": SECOND_MOMENT_ITSELF}


def snapshots(
    architecture: str, seed: int = 0
) -> Iterator[tuple[int, list[tuple[Tensor, Tensor]]]]:
    """(step, the moments of each tensor of >= MIN_8BIT_SIZE elements) at each of SNAPSHOTS."""
    torch.manual_seed(seed)
    model = make_model(architecture, MODEL)
    optimizer = AdaWarm(
        model.parameters(), lr=LR, betas=(BETA1, BETA2), weight_decay=WEIGHT_DECAY, backend="torch"
    )
    text = corpus()
    train = batches(text.train, MODEL.context, BATCH_SIZE, max(SNAPSHOTS), seed)
    for step in range(1, max(SNAPSHOTS) + 1):
        optimizer.zero_grad()
        loss_on(model, train[step - 1]).backward()
        optimizer.step()
        if step in SNAPSHOTS:
            yield (
                step,
                [
                    (state["exp_avg"].clone(), state["exp_avg_sq"].clone())
                    for param, state in optimizer.state.items()
                    if param.numel() >= MIN_8BIT_SIZE
                ],
            )


def stored(values: Tensor, code: Code, block_size: int, base: int | None) -> Tensor:
    """``values`` after one 8-bit store: to the nearest code (``base`` None) or stochastically."""
    bits = None if base is None else random_bits(base, values.numel(), values.device)
    return dequantize(*quantize(values, code, bits, block_size), code, block_size)


def relative_error(pairs: list[tuple[Tensor, Tensor]]) -> float:
    """``||a - b|| / ||b||`` over every (a, b) of ``pairs`` together."""
    difference = sum(float((a - b).square().sum()) for a, b in pairs)
    size = sum(float(b.square().sum()) for _, b in pairs)
    return (difference / size) ** 0.5 if size > 0 else 0.0


def errors(
    moments: list[tuple[Tensor, Tensor]], step: int, block_size: int, second: Code, base
) -> dict[str, float]:
    """The relative errors of one store of ``moments`` at ``step``: first moment, square root
    of the second, and the update (with the step's bias corrections)."""
    correction1, correction2 = 1 - BETA1**step, 1 - BETA2**step
    firsts, roots, updates = [], [], []
    for index, (exp_avg, exp_avg_sq) in enumerate(moments):
        seeds = (None, None) if base is None else (base + 2 * index, base + 2 * index + 1)
        m = stored(exp_avg, FIRST_MOMENT, block_size, seeds[0])
        v = stored(exp_avg_sq, second, block_size, seeds[1])
        firsts.append((m, exp_avg))
        roots.append((v.sqrt(), exp_avg_sq.sqrt()))
        exact = (exp_avg / correction1) / ((exp_avg_sq / correction2).sqrt() + EPS)
        updates.append(((m / correction1) / ((v / correction2).sqrt() + EPS), exact))
    return {
        "first moment": relative_error(firsts),
        "sqrt(second moment)": relative_error(roots),
        "update": relative_error(updates),
    }


def measure() -> list[dict]:
    """One row per (model, step, second moment's code, block size, rounding)."""
    rows = []
    for architecture in ARCHITECTURES:
        for step, moments in snapshots(architecture):
            for name, second in SECOND_MOMENT_CODES.items():
                for block_size in BLOCK_SIZES:
                    for rounding, base in (("nearest", None), ("stochastic", 12345)):
                        found = errors(moments, step, block_size, second, base)
                        rows.append(
                            {
                                "model": architecture,
                                "step": step,
                                "second moment coded as": name,
                                "block size": block_size,
                                "rounding": rounding,
                                **found,
                            }
                        )
    return rows


def report(rows: list[dict], heading: str) -> list[str]:
    """The update's error per block size, a table per rounding; then the moments' own."""
    lines = [heading, ""]
    for rounding in ("nearest", "stochastic"):
        lines += [
            f"### The update's relative error, one {rounding} store",
            "",
            "| model | step | second moment coded as | "
            + " | ".join(f"block {b}" for b in BLOCK_SIZES)
            + " |",
            "| --- | ---: | --- | " + " | ".join("---:" for _ in BLOCK_SIZES) + " |",
        ]
        keys = sorted(
            {(r["model"], r["step"], r["second moment coded as"]) for r in rows},
            key=lambda k: (ARCHITECTURES.index(k[0]), k[1], k[2]),
        )
        for model, step, coded in keys:
            found = {
                r["block size"]: r["update"]
                for r in rows
                if (r["model"], r["step"], r["second moment coded as"], r["rounding"])
                == (model, step, coded, rounding)
            }
            cells = " | ".join(f"{100 * found[b]:.2f} %" for b in BLOCK_SIZES)
            lines.append(f"| {model} | {step} | {coded} | {cells} |")
        lines.append("")
    lines += [
        "Bytes of state per parameter, two moments: "
        + ", ".join(f"block {b}: {2 * (1 + 4 / b):.3f}" for b in BLOCK_SIZES)
        + " (one byte and a 4-byte scale per block, each).",
    ]
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench quantization", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = measure()
    # the runs are the models' training runs; each is measured at every snapshot
    heading = measured_heading(
        1, len(ARCHITECTURES), time.perf_counter() - start, "python -m bench quantization"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps({"heading": heading, "rows": rows}))
    text = "\n".join(report(rows, heading))
    (args.out / "quantization.md").write_text(text + "\n")
    print(text)
    return rows
