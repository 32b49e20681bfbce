"""The schedule-free step and the train/eval switch, dispatched to a backend that
``adawarm.functional.select_execution`` has approved for the tensors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from adawarm.schedule_free_torch import schedule_free_torch_step, switch_torch
from adawarm.tensor_lists import PackedTensors
from adawarm.triton_backend import triton_schedule_free_step, triton_switch


def run_schedule_free(
    backend: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    zs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    weight_sums: Sequence[Tensor],
    lr_maxes: Sequence[Tensor],
    *,
    torch_implementation: str | None,
    table_cache: dict | None,
    gradient_scratch: PackedTensors | None = None,
    **options,
) -> Tensor | None:
    """One schedule-free step (``warmup_steps`` resolved to an int) on ``backend``; with the
    measured warmup, returns the factor it applied (a tensor)."""
    tensors = (params, grads, zs, exp_avg_sqs, state_steps, weight_sums, lr_maxes)
    if backend == "triton":
        return triton_schedule_free_step(*tensors, **options, table_cache=table_cache)
    return schedule_free_torch_step(
        *tensors,
        **options,
        implementation=torch_implementation,
        gradient_scratch=gradient_scratch,
    )


def switch(
    backend: str,
    params: Sequence[Tensor],
    zs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    weight: float,
    compensations: Sequence[Tensor | None],
    rounding_seed: int | None,
    stochastic_params: bool,
    foreach: bool,
) -> None:
    """``p <- p + weight (z - p)`` for every parameter, on ``backend``: see
    :func:`adawarm.schedule_free_torch.switch_torch`."""
    options = {
        "weight": weight,
        "compensations": compensations,
        "rounding_seed": rounding_seed,
        "stochastic_params": stochastic_params,
    }
    if backend == "triton":
        triton_switch(params, zs, state_steps, **options)
    else:
        switch_torch(params, zs, state_steps, **options, foreach=foreach)
