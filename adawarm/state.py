"""The per-parameter state of AdaWarm: its entries, their dtypes and layouts.

``step`` (float32 scalar tensor), ``exp_avg`` and ``exp_avg_sq`` -- torch.optim.AdamW's and
RAdam's names, so state_dicts interchange -- and, for Kahan-compensated fp16/bf16 parameters,
``compensation``; with ``warmup_steps="measured"``, ``relative_update``: the pair
``(update_sq, param_sq)`` of the tensor's last step (``adawarm.schedule.measured_factor``), in
the dtype the update is computed in (fp64 for fp64 parameters, fp32 otherwise).

With ``state_dtype=torch.uint8``, a moment of a tensor of at least ``min_8bit_size`` elements is
8-bit (``adawarm.quantization``): ``exp_avg`` holds a uint8 code per element (contiguous, in the
parameter's shape; blocks of ``QUANTIZATION_BLOCK`` run through its elements in row-major
order) and ``exp_avg_scales`` a float32 scale per block, and so for ``exp_avg_sq``. A block
whose scale is 0 holds zeros, whatever its codes: a new state is zeros throughout. The codes of
a DTensor parameter (FSDP2) are a DTensor of its sharding, and its scales a plain tensor of its
local shard's blocks: blocks never straddle a shard boundary (``adawarm.checkpoint`` says how
such states are saved).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adawarm.functional import local_tensors
from adawarm.quantization import EIGHT_BIT, MIN_8BIT_SIZE, block_count, scales_key
from adawarm.torch_backend import compute_dtype

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype_for(
    param: Tensor, state_dtype: torch.dtype | None = None, min_8bit_size: int = MIN_8BIT_SIZE
) -> torch.dtype:
    """The dtype of ``exp_avg``/``exp_avg_sq``: ``state_dtype`` when given (bf16 moments; 8-bit
    ones for tensors of at least ``min_8bit_size`` elements, fp32 below), else fp32 for
    fp16/bf16/fp32 parameters and the parameter's own dtype when wider (fp64, complex)."""
    if param.dtype not in (*_LOW_PRECISION, torch.float32):
        return param.dtype
    if state_dtype == EIGHT_BIT and param.numel() < min_8bit_size:
        return torch.float32
    return state_dtype or torch.float32


def moment_like(
    param: Tensor, state_dtype: torch.dtype | None = None, min_8bit_size: int = MIN_8BIT_SIZE
) -> Tensor:
    """A zero moment buffer for ``param`` in the state dtype: its shape and strides, or, 8-bit,
    its shape, contiguous (see the module's docstring)."""
    dtype = state_dtype_for(param, state_dtype, min_8bit_size)
    if dtype == EIGHT_BIT:  # a DTensor's codes: a DTensor of its sharding
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)


def iterate_like(param: Tensor, state_dtype: torch.dtype | None) -> Tensor:
    """A zero buffer for AdaWarmScheduleFree's ``z`` (an iterate, not a moment): as a moment,
    but fp32 where the moments are 8-bit (``z`` is not quantized)."""
    return moment_like(param, None if state_dtype == EIGHT_BIT else state_dtype)


def scales_like(moment: Tensor) -> Tensor:
    """The zero block scales of the 8-bit ``moment``: of its local shard where it is a DTensor
    (blocks never straddle a shard boundary), a plain tensor."""
    local = local_tensors([moment])[0]
    return torch.zeros(block_count(local.numel()), dtype=torch.float32, device=local.device)


def moment_entries(
    param: Tensor, key: str, state_dtype: torch.dtype | None, min_8bit_size: int
) -> dict[str, Tensor]:
    """The state entries of a zero moment ``key`` of ``param``: the moment, and its scales
    where it is 8-bit."""
    moment = moment_like(param, state_dtype, min_8bit_size)
    if moment.dtype != EIGHT_BIT:
        return {key: moment}
    return {key: moment, scales_key(key): scales_like(moment)}


def needs_compensation(param: Tensor, compensation: str | None) -> bool:
    """Whether ``param`` keeps a Kahan buffer: only fp16/bf16 parameters lose small updates."""
    return compensation == "kahan" and param.dtype in _LOW_PRECISION


def new_state(
    param: Tensor,
    *,
    state_dtype: torch.dtype | None,
    min_8bit_size: int,
    compensation: str | None,
    counter_device: torch.device | str,
) -> dict[str, Tensor]:
    """The state of a parameter before its first step: zeros, the counter on ``counter_device``."""
    state = {"step": torch.zeros((), dtype=torch.float32, device=counter_device)}
    for key in ("exp_avg", "exp_avg_sq"):
        state.update(moment_entries(param, key, state_dtype, min_8bit_size))
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
