"""The per-parameter state of AdaWarm: its entries, their dtypes and layouts.

``step`` (float32 scalar tensor), ``exp_avg`` and ``exp_avg_sq`` -- torch.optim.AdamW's and
RAdam's names, so state_dicts interchange -- and, for Kahan-compensated fp16/bf16 parameters,
``compensation``.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
