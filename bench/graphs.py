"""Replaying a step from a captured CUDA graph, with a stand-in that runs the same code on a CPU.

``python -m bench gpu --rehearse`` runs every stage on a CPU, where no graph can be captured:
there :func:`replayable` warms up as on a GPU and returns the step itself, so everything around
the capture (capturable optimizers, tensor learning rates, static gradients) still runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_CALLS = 3


def replayable(
    step: Callable[[], object], device: torch.device, warmup_calls: int = WARMUP_CALLS
) -> Callable[[], None]:
    """``step`` captured into a CUDA graph, as the graph's replay.

    First ``warmup_calls`` calls run eagerly on a side stream, as CUDA graphs require: they create
    what a first step allocates (optimizer states, pointer tables, cuBLAS workspaces) outside the
    capture. The capture itself records ``step`` without running it, so after this the step has
    run ``warmup_calls`` times. ``step`` must keep its tensors in place from call to call (zero
    gradients in place, ``set_to_none=False``): a replay reads and writes the captured addresses.

    On a CPU (the rehearsal) the same warm-up calls run and ``step`` itself is returned.
    """
    if device.type != "cuda":
        for _ in range(warmup_calls):
            step()
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
