"""The per-parameter state of AdaWarm: its entries, their dtypes and layouts.

``step`` (float32 scalar tensor), ``exp_avg`` and ``exp_avg_sq`` -- torch.optim.AdamW's and
RAdam's names, so state_dicts interchange -- and, for Kahan-compensated fp16/bf16 parameters,
``compensation``; with ``warmup_steps="measured"``, ``relative_update``: the pair
``(update_sq, param_sq)`` of the tensor's last step (``adawarm.schedule.measured_factor``), in
the dtype the update is computed in (fp64 for fp64 parameters, fp32 otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adawarm.torch_backend import compute_dtype

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype_for(param: Tensor, state_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of ``exp_avg``/``exp_avg_sq``: ``state_dtype`` when given (bf16 moments), else fp32
    for fp16/bf16/fp32 parameters and the parameter's own dtype when wider (fp64, complex)."""
    if param.dtype in (*_LOW_PRECISION, torch.float32):
        return state_dtype or torch.float32
    return param.dtype


def moment_like(param: Tensor, state_dtype: torch.dtype | None = None) -> Tensor:
    """A zero moment buffer for ``param``: its shape and strides, in the state dtype."""
    return torch.zeros_like(
        param, dtype=state_dtype_for(param, state_dtype), memory_format=torch.preserve_format
    )


def needs_compensation(param: Tensor, compensation: str | None) -> bool:
    """Whether ``param`` keeps a Kahan buffer: only fp16/bf16 parameters lose small updates."""
    return compensation == "kahan" and param.dtype in _LOW_PRECISION


def new_state(
    param: Tensor,
    *,
    state_dtype: torch.dtype | None,
    compensation: str | None,
    counter_device: torch.device | str,
) -> dict[str, Tensor]:
    """The state of a parameter before its first step: zeros, the counter on ``counter_device``."""
    state = {
        "step": torch.zeros((), dtype=torch.float32, device=counter_device),
        "exp_avg": moment_like(param, state_dtype),
        "exp_avg_sq": moment_like(param, state_dtype),
    }
    if needs_compensation(param, compensation):
        state["compensation"] = torch.zeros_like(param)
    return state


def first_relative_update(param: Tensor, device: torch.device | str) -> Tensor:
    """The ``relative_update`` entry of ``param`` before its first step, on ``device``: its
    element count (a complex element is two reals) and its squared norm (see
    ``adawarm.schedule.measured_factor``).
    One pass over the parameter, on its own device: only its squared norm goes to ``device``."""
    real = torch.view_as_real(param.detach()) if param.is_complex() else param.detach()
    param_sq = real.to(compute_dtype(real.dtype)).square().sum()
    count = torch.full((), float(real.numel()), dtype=param_sq.dtype, device=param_sq.device)
    return torch.stack([count, param_sq]).to(device)
