"""Checkpoint rules of AdaWarmScheduleFree: what it keeps, converts and drops when it loads.

A state_dict may come from AdaWarmScheduleFree or from schedulefree's ``AdamWScheduleFree`` /
``RAdamScheduleFree``; both keep ``z`` and ``exp_avg_sq`` per parameter and the mode in each
group's ``train_mode``:

- The mode comes from the checkpoint: it says which point (``y`` or ``x``) the parameters saved
  beside it hold, whichever mode it was saved in.
- schedulefree counts steps and averages per group (``k``, ``weight_sum``, ``lr_max``);
  AdaWarmScheduleFree per parameter (``step``, ``weight_sum``, ``lr_max``): each parameter with
  a state gets its group's values. Its ``scheduled_lr`` (a log entry) and ``silent_sgd_phase``
  (RAdamScheduleFree: refused when False, as AdaWarmScheduleFree's rectified steps are silent)
  are dropped.
- Otherwise as ``adawarm.checkpoint``: hyper-parameters come from the checkpoint, those it lacks
  (``warmup_steps`` of RAdamScheduleFree, ``rectify``, ``total_steps``) keep the loading
  optimizer's values; execution and storage choices stay the loading optimizer's; ``z`` and
  ``exp_avg_sq`` are cast to its state dtype (``exp_avg_sq`` to or from 8 bits by the same rules;
  ``z`` stays fp32 where the state dtype is 8-bit); Kahan buffers kept, created or dropped; a
  measured warmup's ``relative_update`` kept where the loaded group measures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adawarm.checkpoint import (
    EXECUTION_KEYS,
    STORAGE_KEYS,
    check_saved_moment,
    loaded_moment,
    loaded_relative_update,
    step_counter,
)
from adawarm.state import iterate_like, needs_compensation
from adawarm.validation import check_schedule_free_group

STATE_TENSORS = ("z", "exp_avg_sq")
# Entries of schedulefree's groups that AdaWarmScheduleFree keeps elsewhere or not at all.
SCHEDULEFREE_GROUP_KEYS = ("k", "weight_sum", "lr_max", "scheduled_lr", "silent_sgd_phase")


def prepare(optimizer, state_dict: dict[str, Any]) -> tuple[list[dict], list[tuple]]:
    """The param groups to hand to torch's loader and, per parameter with a saved state, its
    converted state; raises before anything loads if the checkpoint cannot be continued."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"Loaded state dict has {len(saved_groups)} parameter groups, expected "
            f"{len(optimizer.param_groups)}"
        )
    groups, loaded = [], []
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups, strict=True)):
        merged = _loaded_group(group, saved, index)
        groups.append(merged)
        for param, param_id in zip(group["params"], saved["params"], strict=True):
            saved_state = state_dict["state"].get(param_id)
            if saved_state:
                state = _converted_state(param, saved_state, saved, merged, param_id)
                loaded.append((param, state))
    return groups, loaded


def _loaded_group(group: dict[str, Any], saved: dict[str, Any], index: int) -> dict[str, Any]:
    if len(saved["params"]) != len(group["params"]):
        raise ValueError(
            f"Loaded parameter group {index} has {len(saved['params'])} parameters, "
            f"expected {len(group['params'])}"
        )
    if "train_mode" not in saved:
        raise ValueError(
            f"Loaded parameter group {index} has no train_mode: not a schedule-free checkpoint "
            "(AdaWarmScheduleFree loads its own and schedulefree's AdamWScheduleFree / "
            "RAdamScheduleFree state_dicts)"
        )
    if saved.get("silent_sgd_phase", True) is False:
        raise ValueError(
            f"Loaded parameter group {index} uses silent_sgd_phase=False (SGD steps while "
            "RAdam's estimate is unusable); AdaWarmScheduleFree's rectified steps are silent "
            "there"
        )
    merged = {k: v for k, v in saved.items() if k not in SCHEDULEFREE_GROUP_KEYS}
    for key, value in group.items():
        if key != "params":
            merged.setdefault(key, value)
    for key in (*EXECUTION_KEYS, *STORAGE_KEYS):
        merged[key] = group[key]
    check_schedule_free_group(merged)
    return merged


def _converted_state(
    param: Tensor,
    saved: dict[str, Any],
    saved_group: dict[str, Any],
    group: dict[str, Any],
    param_id: Any,
) -> dict[str, Tensor]:
    for key in STATE_TENSORS:
        if key not in saved:
            raise ValueError(f"Loaded state of parameter {param_id} lacks {key!r}")
        check_saved_moment(saved, key, param, param_id)
    if "k" in saved_group:  # schedulefree's: the group's count and average
        step, weight_sum = saved_group["k"], saved_group["weight_sum"]
        lr_max = max(saved_group["lr_max"], 0.0)  # -1 before its first step
    else:
        for key in ("step", "weight_sum", "lr_max"):
            if key not in saved:
                raise ValueError(f"Loaded state of parameter {param_id} lacks {key!r}")
        step, weight_sum, lr_max = saved["step"], saved["weight_sum"], saved["lr_max"]
    state = {
        "step": step_counter(step, param_id),
        "weight_sum": _scalar(weight_sum),
        "lr_max": _scalar(lr_max),
    }
    state["z"] = iterate_like(param, group["state_dtype"]).copy_(saved["z"])
    state.update(loaded_moment(param, saved, "exp_avg_sq", group))
    entry = loaded_relative_update(param, saved, group, param_id)
    if entry is not None:
        state["relative_update"] = entry
    if needs_compensation(param, group["compensation"]):
        buffer = saved.get("compensation")
        state["compensation"] = (
            torch.zeros_like(param) if buffer is None else buffer.to(param).clone()
        )
    return state


def _scalar(value: Any) -> Tensor:
    return torch.tensor(float(value), dtype=torch.float64)
