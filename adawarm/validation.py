"""Checks of AdaWarm's hyper-parameters; each error names the bad value and what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from adawarm.schedule import WARMUP_NAMES, can_rectify, rho_inf

BACKENDS = (None, "torch", "triton")
COMPENSATIONS = (None, "kahan", "stochastic")


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"Invalid lr: a tensor of shape {tuple(lr.shape)} and dtype {lr.dtype}, "
                "expected a float or a one-element floating-point tensor"
            )
        if lr.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # reading the value would synchronise, which a CUDA graph capture forbids
        value = float(lr.detach().cpu())
    elif _is_real_number(lr):
        value = float(lr)
    else:
        raise TypeError(f"Invalid lr: {lr!r}, expected a float >= 0")
    if math.isnan(value) or value < 0.0:
        raise ValueError(f"Invalid lr: {value}, expected 0 <= lr")


def check_group(group: dict[str, Any]) -> None:
    """Raise if any hyper-parameter of one parameter group is out of its domain."""
    check_lr(group["lr"])
    eps = group["eps"]
    if not _is_real_number(eps) or math.isnan(eps) or eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r}, expected 0 <= eps")
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}, expected a pair (beta1, beta2)")
    for index, beta in enumerate(betas):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(
                f"Invalid beta{index + 1}: {beta!r}, expected 0 <= beta{index + 1} < 1"
            )
    weight_decay = group["weight_decay"]
    if not _is_real_number(weight_decay) or math.isnan(weight_decay) or weight_decay < 0.0:
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay!r}, expected 0 <= weight_decay"
        )
    check_warmup_steps(group["warmup_steps"])
    rectify = group["rectify"]
    if not isinstance(rectify, bool):
        raise TypeError(f"Invalid rectify: {rectify!r}, expected True or False")
    beta2 = betas[1]
    if rectify and not can_rectify(beta2):
        raise ValueError(
            f"Invalid beta2 for rectify=True: {beta2!r} gives rho_inf = "
            f"{rho_inf(beta2) if beta2 < 1 else float('inf'):.4g} <= 5, so rectification never "
            "engages; expected beta2 > 2/3, or rectify=False"
        )
    for flag in ("maximize", "capturable"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"Invalid {flag}: {group[flag]!r}, expected True or False")
    if group["state_dtype"] not in (None, torch.float32, torch.bfloat16):
        raise ValueError(
            f"Invalid state_dtype: {group['state_dtype']!r}, expected None, torch.float32 or "
            "torch.bfloat16"
        )
    if group["compensation"] not in COMPENSATIONS:
        raise ValueError(
            f"Invalid compensation: {group['compensation']!r}, expected one of {COMPENSATIONS}"
        )
    seed = group["rounding_seed"]
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"Invalid rounding_seed: {seed!r}, expected an int >= 0")
    backend = group["backend"]
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}, expected one of {BACKENDS}")


def check_warmup_steps(warmup_steps: Any) -> None:
    if isinstance(warmup_steps, str):
        if warmup_steps not in WARMUP_NAMES:
            raise ValueError(
                f"Invalid warmup_steps: {warmup_steps!r}, expected an int >= 0 or one of "
                f"{WARMUP_NAMES}"
            )
        return
    if not isinstance(warmup_steps, numbers.Integral) or isinstance(warmup_steps, bool):
        raise TypeError(
            f"Invalid warmup_steps: {warmup_steps!r}, expected an int >= 0 or one of {WARMUP_NAMES}"
        )
    if warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps}, expected an int >= 0")
