"""BatchNorm's running statistics at a schedule-free optimizer's averaged point.

In train mode the parameters hold ``y``, so BatchNorm layers accumulate their running mean and
variance there; ``optimizer.eval()`` moves the parameters to ``x``, whose statistics differ. Before
evaluating with BatchNorm, recompute them at ``x``: a few batches of training data, forward only.
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
    gradients. ``forward(model, batch)`` runs one batch; by default a tuple or list batch -- the
    ``(inputs, targets)`` a DataLoader yields -- feeds its first element, ``model(batch[0])``,
    and any other batch itself, ``model(batch)``. Afterwards every layer's momentum and the
    model's train/eval mode are as they were.

    Raises:
        TypeError: the model could not take a batch by that default (for example a dict of
            keyword arguments); it names ``forward=``, which runs any batch.
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
                _feed(model, batch)
            else:
                forward(model, batch)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)


def _feed(model: nn.Module, batch: Any) -> None:
    inputs = batch[0] if isinstance(batch, tuple | list) else batch
    try:
        model(inputs)
    except (TypeError, AttributeError) as error:
        fed = "its first element" if inputs is not batch else "the batch itself"
        raise TypeError(
            f"recompute_batchnorm_statistics could not run the model on a batch of type "
            f"{type(batch).__name__} (it fed {fed}, of type {type(inputs).__name__}): pass "
            "forward=lambda model, batch: ... to run such batches (e.g. model(**batch) for a "
            "dict). By default a tuple or list batch feeds its first element and any other "
            f"batch itself. The model raised {type(error).__name__}: {error}"
        ) from error
