"""BatchNorm's running statistics at a schedule-free optimizer's averaged point.

In train mode the parameters hold ``y``, so BatchNorm layers accumulate their running mean and
variance there; ``optimizer.eval()`` moves the parameters to ``x``, whose statistics differ. Before
evaluating with BatchNorm, recompute them at ``x``: a few hundred samples of training data,
forward only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], object] | None = None,
) -> None:
    """Recompute the running statistics of every BatchNorm layer of ``model`` at its current
    parameters (call after ``optimizer.eval()``).

    Each layer's statistics are reset and averaged over ``batches`` with equal weights
    (``momentum=None``, a cumulative average), the model running in train mode without
    gradients; ``forward(model, batch)`` runs one batch (default: ``model(batch)``). Afterwards
    every layer's momentum and the model's train/eval mode are as they were.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    try:
        for batch in batches:
            if forward is None:
                model(batch)
            else:
                forward(model, batch)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)
