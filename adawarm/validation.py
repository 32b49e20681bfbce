"""Checks of AdaWarm's hyper-parameters; each error names the bad value and what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from adawarm.schedule import WARMUP_NAMES, can_rectify, rho_inf

BACKENDS = (None, "torch", "triton")
COMPENSATIONS = (None, "kahan", "stochastic")
# torch.uint8: 8-bit moments (adawarm.quantization)
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.uint8)


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _reading_would_sync(value: torch.Tensor) -> bool:
    """Whether reading ``value`` on the host now would break a CUDA graph capture."""
    return value.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_tensor_scalar(value: torch.Tensor, name: str, torch_name: str) -> None:
    """A tensor hyper-parameter must be one floating-point element. For a wrong size the error
    keeps torch.optim's words (``Tensor lr must be 1-element``), which code written against
    torch's optimizers may match."""
    if value.numel() == 1 and value.is_floating_point():
        return
    torchs = f" (Tensor {torch_name} must be 1-element)" if value.numel() != 1 else ""
    raise ValueError(
        f"Invalid {name}: a tensor of shape {tuple(value.shape)} and dtype {value.dtype}, "
        f"expected a float or a one-element floating-point tensor{torchs}"
    )


def check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor):
        _check_tensor_scalar(lr, "lr", "lr")
        if _reading_would_sync(lr):
            return  # the kernel reads it on the device; a capture forbids reading it here
        value = float(lr.detach().cpu())
    elif _is_real_number(lr):
        value = float(lr)
    else:
        raise TypeError(f"Invalid lr: {lr!r}, expected a float >= 0")
    if math.isnan(value) or value < 0.0:
        raise ValueError(f"Invalid lr: {value}, expected 0 <= lr")


def group_betas(group: dict[str, Any]) -> tuple[float, float]:
    """A group's ``(beta1, beta2)`` as floats: one-element tensors (which torch.optim.AdamW also
    takes, so a schedule can change them in place) are read on the host at every step."""
    values = []
    for index, beta in enumerate(group["betas"]):
        if isinstance(beta, torch.Tensor):
            _check_tensor_scalar(beta, f"beta{index + 1}", f"betas[{index}]")
            if _reading_would_sync(beta):
                raise RuntimeError(
                    f"beta{index + 1} is a CUDA tensor, which AdaWarm reads on the host at every "
                    "step, and a CUDA graph capture forbids that read; pass betas as floats or "
                    "CPU tensors"
                )
            values.append(float(beta.detach().cpu()))
        elif _is_real_number(beta):
            values.append(float(beta))
        else:
            raise TypeError(
                f"Invalid beta{index + 1}: {beta!r}, expected a float or a one-element tensor"
            )
    return values[0], values[1]


def check_torch_only_options(*, amsgrad: Any, differentiable: Any) -> None:
    """Refuse the torch.optim.AdamW options that AdaWarm has no algorithm for (False is fine)."""
    if amsgrad is not False:
        raise ValueError(
            f"Invalid amsgrad: {amsgrad!r}; AdaWarm has no AMSGrad variant, expected False"
        )
    if differentiable is not False:
        raise ValueError(
            f"Invalid differentiable: {differentiable!r}; AdaWarm's step does not record "
            "autograd history (like torch's fused optimizers), expected False"
        )


def check_group(group: dict[str, Any]) -> None:
    """Raise if any hyper-parameter of one parameter group is out of its domain."""
    check_lr(group["lr"])
    eps = group["eps"]
    if not _is_real_number(eps) or math.isnan(eps) or eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r}, expected 0 <= eps")
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}, expected a pair (beta1, beta2)")
    for index, beta in enumerate(group_betas(group)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(
                f"Invalid beta{index + 1}: {betas[index]!r}, expected 0 <= beta{index + 1} < 1"
            )
    weight_decay = group["weight_decay"]
    if not _is_real_number(weight_decay) or math.isnan(weight_decay) or weight_decay < 0.0:
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay!r}, expected 0 <= weight_decay"
        )
    check_warmup_steps(group["warmup_steps"])
    total_steps = group["total_steps"]
    if total_steps is not None and (
        not isinstance(total_steps, numbers.Integral)
        or isinstance(total_steps, bool)
        or total_steps < 1
    ):
        raise ValueError(f"Invalid total_steps: {total_steps!r}, expected None or an int >= 1")
    rectify = group["rectify"]
    if not isinstance(rectify, bool):
        raise TypeError(f"Invalid rectify: {rectify!r}, expected True or False")
    beta2 = group_betas(group)[1]
    if rectify and not can_rectify(beta2):
        raise ValueError(
            f"Invalid beta2 for rectify=True: {betas[1]!r} gives rho_inf = "
            f"{rho_inf(beta2):.4g} <= 5, so rectification never engages; expected beta2 > 2/3, "
            "or rectify=False"
        )
    for flag in ("maximize", "capturable"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"Invalid {flag}: {group[flag]!r}, expected True or False")
    check_torch_only_options(
        amsgrad=group.get("amsgrad", False), differentiable=group.get("differentiable", False)
    )
    if group["state_dtype"] not in STATE_DTYPES:
        raise ValueError(
            f"Invalid state_dtype: {group['state_dtype']!r}, expected None, torch.float32, "
            "torch.bfloat16 or torch.uint8 (8-bit)"
        )
    min_8bit_size = group["min_8bit_size"]
    if (
        not isinstance(min_8bit_size, numbers.Integral)
        or isinstance(min_8bit_size, bool)
        or min_8bit_size < 0
    ):
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r}, expected an int >= 0")
    if group["compensation"] not in COMPENSATIONS:
        raise ValueError(
            f"Invalid compensation: {group['compensation']!r}, expected one of {COMPENSATIONS}"
        )
    seed = group["rounding_seed"]
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"Invalid rounding_seed: {seed!r}, expected an int >= 0")
    check_execution(group)


def check_execution(group: dict[str, Any]) -> None:
    """The execution choices (backend, foreach, fused, capturable) agree with each other."""
    backend, foreach, fused = group["backend"], group["foreach"], group["fused"]
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}, expected one of {BACKENDS}")
    for name, flag in (("foreach", foreach), ("fused", fused)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"Invalid {name}: {flag!r}, expected None, True or False")
    if foreach and fused:
        raise ValueError(
            "Invalid foreach=True with fused=True: each names an implementation, expected at "
            "most one of them True (as torch.optim.AdamW)"
        )
    # foreach (either value) and fused=False name implementations of the torch backend.
    if foreach is not None:
        torch_only = f"foreach={foreach}"
    elif fused is False:
        torch_only = "fused=False"
    else:
        torch_only = None
    if torch_only is not None and backend == "triton":
        raise ValueError(
            f"Invalid {torch_only} with backend='triton': it selects an implementation of the "
            "torch backend; expected foreach=None and fused=None or True with the Triton backend"
        )
    if group["capturable"] and (backend == "torch" or torch_only is not None):
        raise ValueError(
            f"Invalid capturable=True with "
            f"{torch_only or 'backend=' + repr(backend)}: a capturable step needs the Triton "
            "backend; expected backend=None or 'triton', foreach=None, fused=None or True"
        )


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


def check_schedule_free_group(group: dict[str, Any]) -> None:
    """Raise if any hyper-parameter of one AdaWarmScheduleFree group is out of its domain: those
    it shares with AdaWarm, and the averaging's ``r`` and ``weight_lr_power``."""
    check_group(group)
    beta1 = group_betas(group)[0]
    if beta1 == 0.0:
        raise ValueError(
            f"Invalid beta1: {group['betas'][0]!r}, expected 0 < beta1 < 1 (the eval point "
            "x = y + (1 - 1/beta1)(z - y) needs beta1 > 0)"
        )
    for name in ("r", "weight_lr_power"):
        value = group[name]
        if not _is_real_number(value) or not math.isfinite(value) or value < 0.0:
            raise ValueError(f"Invalid {name}: {value!r}, expected a finite float >= 0")
    if not isinstance(group["train_mode"], bool):
        raise TypeError(f"Invalid train_mode: {group['train_mode']!r}, expected True or False")
