"""Checkpoint rules: what AdaWarm keeps, converts and drops when it loads a state_dict.

A state_dict may come from AdaWarm (this version or an older one), ``torch.optim.AdamW`` or
``torch.optim.RAdam`` -- all share the state names ``step``, ``exp_avg`` and ``exp_avg_sq``:

- Hyper-parameters come from the checkpoint; those it lacks keep the loading optimizer's values
  (``rectify`` from torch's optimizers), except that a group trained by torch's optimizers counts
  as warmed up: it loads with ``warmup_steps=0``, so training goes on without a new ramp.
- Execution choices (``backend``, ``foreach``, ``fused``, ``capturable``) and storage choices
  (``state_dtype``, ``compensation``) stay the loading optimizer's: they say how this run
  computes and stores, not what was learned.
- Keys that only torch's optimizers use (``amsgrad``, ``differentiable``,
  ``decoupled_weight_decay``) are dropped, after refusing what AdaWarm cannot continue
  (AMSGrad, coupled L2 decay).
- ``step`` becomes a float32 scalar tensor on the CPU, whatever the checkpoint held: a tensor,
  or a Python number (older torch versions saved those).
- Moments are cast to the loading optimizer's state dtype (rounding to nearest even; bf16 ->
  fp32 is exact). 8-bit moments (``adawarm.quantization``) load as they are into 8-bit states,
  bit for bit with their scales; into other dtypes as the values they code (cast as above);
  full-precision moments load into 8-bit states quantized to the nearest codes (a
  deterministic conversion; the codes of a later step are drawn stochastically).
- Kahan buffers are kept when both sides have them, created as zeros when only the loader
  wants them, dropped otherwise. A measured warmup's ``relative_update`` is kept (on the CPU,
  in the update's dtype) when the loaded group is ``warmup_steps="measured"``; without one,
  its first step there measures as a first step does. Other state entries are dropped.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from adawarm.functional import has_dtensors, local_tensors
from adawarm.quantization import (
    EIGHT_BIT,
    STATE_CODES,
    block_count,
    dequantize,
    quantize,
    scales_key,
)
from adawarm.schedule import MEASURED
from adawarm.state import moment_like, needs_compensation
from adawarm.torch_backend import compute_dtype
from adawarm.validation import check_group

# Keys torch.optim.AdamW/RAdam keep in their param groups that mean nothing to AdaWarm.
FOREIGN_GROUP_KEYS = ("amsgrad", "differentiable", "decoupled_weight_decay")
# Execution choices: a loaded checkpoint does not change them.
EXECUTION_KEYS = ("backend", "foreach", "fused", "capturable")
# Storage choices: the checkpoint's states are converted to the loading optimizer's.
STORAGE_KEYS = ("state_dtype", "min_8bit_size", "compensation")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
# The code of each moment that may be 8-bit: the backends' first and second state's.
MOMENT_CODES = dict(zip(MOMENT_KEYS, STATE_CODES, strict=True))


def loaded_group(
    group: dict[str, Any], saved: dict[str, Any], index: int, trained: bool
) -> dict[str, Any]:
    """The param group that loading ``saved`` into ``group`` gives (``params`` still the saved
    ids, which torch's loader replaces), checked. ``trained``: the checkpoint has state for a
    parameter of the group."""
    if len(saved["params"]) != len(group["params"]):
        raise ValueError(
            f"Loaded parameter group {index} has {len(saved['params'])} parameters, "
            f"expected {len(group['params'])}"
        )
    if saved.get("amsgrad", False):
        raise ValueError(
            f"Loaded parameter group {index} uses amsgrad=True; AdaWarm has no AMSGrad"
        )
    if not saved.get("decoupled_weight_decay", True) and saved.get("weight_decay", 0):
        raise ValueError(
            f"Loaded parameter group {index} uses coupled (L2) weight decay "
            f"{saved['weight_decay']!r}; AdaWarm's weight decay is decoupled"
        )
    merged = {k: v for k, v in saved.items() if k not in FOREIGN_GROUP_KEYS}
    if "warmup_steps" not in saved and trained:
        # A torch optimizer's checkpoint: its steps count as warmed up, so training goes on at
        # its rate instead of ramping up again.
        merged["warmup_steps"] = 0
    for key, value in group.items():
        if key != "params":
            merged.setdefault(key, value)
    for key in (*EXECUTION_KEYS, *STORAGE_KEYS):
        merged[key] = group[key]
    check_group(merged)
    return merged


def check_saved_state(saved: dict[str, Any] | None, param: Tensor, param_id: Any) -> None:
    """Raise if a parameter's saved state cannot be loaded for ``param``."""
    if not saved:
        return
    for key in ("step", *MOMENT_KEYS):
        if key not in saved:
            raise ValueError(f"Loaded state of parameter {param_id} lacks {key!r}")
    step_counter(saved["step"], param_id)
    if "relative_update" in saved:
        relative_update_entry(saved["relative_update"], param_id)
    for key in MOMENT_KEYS:
        check_saved_moment(saved, key, param, param_id)


def check_saved_moment(saved: dict[str, Any], key: str, param: Tensor, param_id: Any) -> None:
    """Raise if the saved moment ``key`` cannot be loaded for ``param``: a shape other than the
    parameter's, or 8-bit codes without float32 scales, one per block."""
    shape = tuple(saved[key].shape)
    if shape != tuple(param.shape):
        raise ValueError(
            f"Loaded {key} of parameter {param_id} has shape {shape}, expected "
            f"{tuple(param.shape)} (the parameter's shape)"
        )
    if saved[key].dtype != EIGHT_BIT:
        return
    scales = saved.get(scales_key(key))
    blocks = (block_count(param.numel()),)
    if (
        not isinstance(scales, Tensor)
        or tuple(scales.shape) != blocks
        or scales.dtype != torch.float32
    ):
        described = (
            f"{scales.dtype} of shape {tuple(scales.shape)}"
            if isinstance(scales, Tensor)
            else repr(scales)
        )
        raise ValueError(
            f"Loaded {key} of parameter {param_id} is 8-bit, and its {scales_key(key)} is "
            f"{described}; expected float32 scales of shape {blocks}"
        )


def step_counter(value: Any, param_id: Any) -> Tensor:
    """A saved ``step`` (a tensor or a Python number) as a float32 scalar tensor on the CPU."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Loaded step of parameter {param_id} is a tensor of shape "
                f"{tuple(value.shape)}, expected a scalar"
            )
        number = float(value.detach().cpu())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"Loaded step of parameter {param_id} is {value!r}, expected a number")
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(
            f"Loaded step of parameter {param_id} is {number!r}, expected a whole number >= 0"
        )
    return torch.tensor(number, dtype=torch.float32)


def converted_state(
    param: Tensor, saved: dict[str, Any], group: dict[str, Any], param_id: Any
) -> dict[str, Tensor]:
    """The state of ``param`` loaded from ``saved`` under ``group``'s storage choices."""
    state = {"step": step_counter(saved["step"], param_id)}
    for key in MOMENT_KEYS:
        state.update(loaded_moment(param, saved, key, group))
    entry = loaded_relative_update(param, saved, group, param_id)
    if entry is not None:
        state["relative_update"] = entry
    if needs_compensation(param, group["compensation"]):
        buffer = saved.get("compensation")
        state["compensation"] = (
            torch.zeros_like(param) if buffer is None else buffer.to(param).clone()
        )
    return state


def loaded_moment(
    param: Tensor, saved: dict[str, Any], key: str, group: dict[str, Any]
) -> dict[str, Tensor]:
    """The state entries of the moment ``key`` of ``param`` loaded from ``saved`` into
    ``group``'s state dtype: the moment, and its scales where that is 8-bit. A DTensor's codes
    come from its shard's values (checkpoints hold sharded 8-bit moments as their values:
    :func:`portable_state`)."""
    target = moment_like(param, group["state_dtype"], group["min_8bit_size"])
    value, code = saved[key], MOMENT_CODES[key]
    if value.dtype == EIGHT_BIT:
        scales = saved[scales_key(key)].to(target.device)
        if target.dtype == EIGHT_BIT and not has_dtensors([target]):
            return {key: target.copy_(value), scales_key(key): scales.clone()}
        value = dequantize(value.to(target.device), scales, code)
    if target.dtype != EIGHT_BIT:
        return {key: target.copy_(value)}
    codes_shard, value_shard = local_tensors([target, value.to(target.device)])
    codes, scales = quantize(value_shard.to(torch.float32), code)
    codes_shard.copy_(codes)
    return {key: target, scales_key(key): scales}


def portable_state(state: dict[str, Any]) -> dict[str, Any]:
    """A parameter's saved state: as held, but that the 8-bit moments of a DTensor parameter
    (FSDP2) become DTensors of their values, without scales. Its codes are blocked by this
    sharding; its values are what torch.distributed.checkpoint can reshard, and loading them
    codes them again (to the nearest codes: the same codes and values under the same sharding,
    since a block's largest element is stored exactly and every code's value is its own
    nearest)."""
    moments = [
        key
        for key, code in MOMENT_CODES.items()
        if scales_key(key) in state and has_dtensors([state[key]])
    ]
    if not moments:
        return state
    from torch.distributed.tensor import DTensor

    state = dict(state)
    for key in moments:
        codes = state[key]
        values = dequantize(codes.to_local(), state.pop(scales_key(key)), MOMENT_CODES[key])
        state[key] = DTensor.from_local(
            values, codes.device_mesh, codes.placements, shape=codes.shape, stride=codes.stride()
        )
    return state


def loaded_relative_update(
    param: Tensor, saved: dict[str, Any], group: dict[str, Any], param_id: Any
) -> Tensor | None:
    """The measured warmup's ``relative_update`` entry that ``param`` loads from ``saved``: on
    the CPU in the update's dtype where the group measures and the checkpoint has one, else
    None (a group that does not measure drops it)."""
    if group["warmup_steps"] != MEASURED or "relative_update" not in saved:
        return None
    entry = relative_update_entry(saved["relative_update"], param_id)
    return entry.to(compute_dtype(param.dtype))


def relative_update_entry(value: Any, param_id: Any) -> Tensor:
    """A saved ``relative_update`` as a pair on the CPU (in its dtype)."""
    if not isinstance(value, Tensor) or value.numel() != 2:
        raise ValueError(
            f"Loaded relative_update of parameter {param_id} is {value!r}, expected a tensor "
            "of two numbers (update_sq, param_sq)"
        )
    return value.detach().to("cpu").reshape(2).clone()


def with_decoupled_decay_flag(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Mark every group's decay as decoupled: torch.optim.RAdam reads a group without this key
    as coupled (L2) decay, and AdaWarm's decay always is decoupled."""
    for group in state_dict["param_groups"]:
        group["decoupled_weight_decay"] = True
    return state_dict
