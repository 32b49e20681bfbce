"""What README.md and docs/ promise of AdaWarm and AdaWarmScheduleFree, as data, and how the
promise matrix (tests/test_promises.py) runs either optimizer.

``PROMISES`` names, per promise and optimizer, the executions it holds on; on the optimizer's
other executions the matrix checks that it is refused, before anything changes. docs/promises.md
shows the same table, and a test keeps the two equal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from helpers import assert_close
from torch import Tensor

from adawarm import AdaWarm, AdaWarmScheduleFree, schedule_free_torch, torch_backend
from adawarm.kernels import adawarm_step, schedule_free_step

# How a step runs: the options that select each execution. "fused" is torch's fused AdamW
# kernel, which serves CPU tensors; "Triton" runs the kernel (under Triton's interpreter on CPU
# tensors when there is no GPU).
EXECUTIONS: dict[str, dict] = {
    "reference": {"backend": "torch", "foreach": False},
    "foreach": {"backend": "torch", "foreach": True},
    "fused": {"backend": "torch", "fused": True},
    "Triton": {"backend": "triton"},
}
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(execution: str) -> torch.device:
    """Where an execution's tensors live: the torch backend's on the CPU, the kernel's on the
    GPU when there is one."""
    return TRITON_DEVICE if execution == "Triton" else torch.device("cpu")


@dataclass(frozen=True)
class Kind:
    """One optimizer class under test, and what the matrix needs to know of it."""

    name: str
    make: type
    # The per-parameter state entries every parameter that has stepped holds.
    state_keys: tuple[str, ...]
    executions: tuple[str, ...]
    # Per execution, where its update launches: (module or dict, name), patched to count or fail.
    launch_points: dict[str, tuple[object, str]] = field(repr=False)
    # The optimizer it replaces, built on params with the same hyper-parameters (upstream).
    upstream: Callable[..., Upstream] = field(repr=False)

    @property
    def schedule_free(self) -> bool:
        return self.make is AdaWarmScheduleFree


class Upstream:
    """The optimizer a kind replaces, stepped like one: ``torch.optim.AdamW`` under the linear
    warmup AdaWarm computes, or schedulefree's ``AdamWScheduleFree`` (in train mode)."""

    def __init__(self, optimizer: torch.optim.Optimizer, after_step: Callable[[], None]):
        self.optimizer, self._after_step = optimizer, after_step
        self.state, self.param_groups = optimizer.state, optimizer.param_groups

    def step(self) -> None:
        self.optimizer.step()
        self._after_step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def __getattr__(self, name: str):  # train()/eval() of schedulefree's optimizers
        return getattr(self.optimizer, name)


def adamw_with_warmup(params, *, warmup_steps: int = 0, **hyper_parameters) -> Upstream:
    optimizer = torch.optim.AdamW(params, **hyper_parameters, foreach=False)
    if not warmup_steps:
        return Upstream(optimizer, lambda: None)
    ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))
    return Upstream(optimizer, ramp.step)


def schedulefree_adamw(params, *, warmup_steps: int = 0, **hyper_parameters) -> Upstream:
    schedulefree = pytest.importorskip(
        "schedulefree", reason="the test extra: pip install -e '.[test]'"
    )
    optimizer = schedulefree.AdamWScheduleFree(
        params, **hyper_parameters, warmup_steps=warmup_steps
    )
    optimizer.train()
    return Upstream(optimizer, lambda: None)


ADAWARM = Kind(
    "AdaWarm",
    AdaWarm,
    ("step", "exp_avg", "exp_avg_sq"),
    ("reference", "foreach", "fused", "Triton"),
    {
        "reference": (torch_backend._BUCKET_STEPS, "reference"),
        "foreach": (torch_backend._BUCKET_STEPS, "foreach"),
        "fused": (torch_backend, "_fused_bucket"),
        "Triton": (adawarm_step, "launch_adawarm_step"),
    },
    adamw_with_warmup,
)
SCHEDULE_FREE = Kind(
    "AdaWarmScheduleFree",
    AdaWarmScheduleFree,
    ("step", "z", "exp_avg_sq", "weight_sum", "lr_max"),
    # No fused PyTorch kernel computes the schedule-free update: fused=True on CPU tensors is
    # refused (the promise "foreach and fused choose the implementation").
    ("reference", "foreach", "Triton"),
    {
        "reference": (schedule_free_torch._BUCKET_STEPS, "reference"),
        "foreach": (schedule_free_torch._BUCKET_STEPS, "foreach"),
        "Triton": (schedule_free_step, "launch_schedule_free_step"),
    },
    schedulefree_adamw,
)
KINDS = (ADAWARM, SCHEDULE_FREE)

TORCH_ADAWARM = ("reference", "foreach", "fused")
TORCH_SCHEDULE_FREE = ("reference", "foreach")
ALL = {"AdaWarm": ADAWARM.executions, "AdaWarmScheduleFree": SCHEDULE_FREE.executions}
TORCH_ONLY = {"AdaWarm": TORCH_ADAWARM, "AdaWarmScheduleFree": TORCH_SCHEDULE_FREE}

# Per promise, per optimizer: the executions it holds on (docs/promises.md shows this table).
PROMISES: dict[str, dict[str, tuple[str, ...]]] = {
    "fp32, bf16 and fp16 parameters": ALL,
    "bf16 state, Kahan and stochastic rounding": ALL,
    "8-bit state": ALL,
    "fp64 parameters": TORCH_ONLY,
    "complex parameters": TORCH_ONLY,
    "the update of the optimizer it replaces": ALL,
    "weight decay": ALL,
    "maximize": ALL,
    "tensor lr and betas": ALL,
    "per-group hyper-parameters": ALL,
    "LR schedulers compose with the ramp": ALL,
    "the warmup's length": ALL,
    "the measured warmup": ALL,
    "closures": ALL,
    "foreach and fused choose the implementation": ALL,
    "GradScaler": ALL,
    "capturable": {"AdaWarm": ("Triton",), "AdaWarmScheduleFree": ("Triton",)},
    "state_dict round trip": ALL,
    "checkpoints of the optimizer it replaces": ALL,
    "all-or-nothing steps": ALL,
    "bad hyper-parameters are refused": ALL,
    "gradients are read, never written": ALL,
}

_USED: set[str] = set()


def cases(promise: str, *, refusals: bool = True) -> list:
    """pytest parameters (kind, execution, holds) for ``promise``: each execution of each kind,
    and whether the promise holds there (else the test checks the refusal). Without
    ``refusals``, only the executions where it holds."""
    _USED.add(promise)
    params = []
    for kind in KINDS:
        holding = PROMISES[promise][kind.name]
        for execution in kind.executions:
            if execution in holding or refusals:
                params.append(
                    pytest.param(
                        kind, execution, execution in holding, id=f"{kind.name}-{execution}"
                    )
                )
    return params


def used_promises() -> set[str]:
    """The promises that some test asked ``cases`` for."""
    return set(_USED)


# -- running an optimizer ----------------------------------------------------------------------


def optimizer_for(kind: Kind, params, execution: str, **options):
    """``kind`` over ``params`` with ``execution``'s options (``options`` override them), ready
    to step (schedule-free: in train mode)."""
    optimizer = kind.make(params, **{**EXECUTIONS[execution], **options})
    if kind.schedule_free:
        optimizer.train()
    return optimizer


def on_device(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Leaf copies of ``tensors`` on ``device`` that require gradients."""
    return [t.detach().to(device, copy=True).requires_grad_() for t in tensors]


def run(
    optimizer,
    params: Sequence[Tensor],
    grads: Sequence[Sequence[Tensor]],
    *,
    evaluate_after: Sequence[int] = (),
    before_step: Callable[[int], None] | None = None,
) -> None:
    """Step ``optimizer`` over ``grads``; a schedule-free optimizer evaluates (``eval()``, then
    ``train()``) after the steps in ``evaluate_after``, as a training loop that evaluates does."""
    for index, step_grads in enumerate(grads):
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.to(param.device, copy=True)
        if before_step is not None:
            before_step(index)
        optimizer.step()
        if index in evaluate_after and hasattr(optimizer, "eval"):
            optimizer.eval()
            optimizer.train()


def observe(optimizer, params: Sequence[Tensor], *, evaluated: bool = True) -> dict[str, Tensor]:
    """Copies of the parameters and every per-parameter state entry, by name; for a
    schedule-free optimizer (``evaluated``) also the averaged point ``x`` (it is left in train
    mode)."""
    seen = {}
    for index, param in enumerate(params):
        seen[f"param {index}"] = param.detach().cpu().clone()
        for key, value in optimizer.state[param].items():
            if isinstance(value, Tensor):
                seen[f"{key} {index}"] = value.detach().cpu().clone()
    if evaluated and hasattr(optimizer, "eval"):
        optimizer.eval()
        for index, param in enumerate(params):
            seen[f"x {index}"] = param.detach().cpu().clone()
        optimizer.train()
    return seen


def real_pairs(seen: dict[str, Tensor]) -> dict[str, Tensor]:
    """Complex entries of an observation as their (real, imaginary) pairs."""
    return {k: torch.view_as_real(v) if v.is_complex() else v for k, v in seen.items()}


def assert_matches(
    actual: dict[str, Tensor], expected: dict[str, Tensor], dtype: torch.dtype, *, every=True
) -> None:
    """Every entry of ``expected`` is in ``actual`` and agrees within ``dtype``'s tolerance
    (step counts exactly); with ``every``, neither has an entry the other lacks."""
    if every:
        assert actual.keys() == expected.keys(), f"{sorted(actual)} != {sorted(expected)}"
    for name, value in expected.items():
        assert name in actual, f"{name} missing"
        mine = actual[name].to(value.dtype)
        if name.startswith("step "):
            assert torch.equal(mine, value), f"{name}: {mine} != {value}"
        else:
            assert_close(mine, value, dtype, name)


def assert_identical(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), name


def snapshot(optimizer, params: Sequence[Tensor]) -> tuple[list[Tensor], dict]:
    """Parameters and the whole state_dict, copied: what a refused call must leave as it was."""
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def assert_unchanged(optimizer, params: Sequence[Tensor], before) -> None:
    values, state_dict = before
    for index, (param, value) in enumerate(zip(params, values, strict=True)):
        assert torch.equal(param.detach(), value), f"parameter {index} changed"
    after = optimizer.state_dict()
    assert after["state"].keys() == state_dict["state"].keys(), "states created or removed"
    for key, state in after["state"].items():
        assert state.keys() == state_dict["state"][key].keys()
        for name, value in state.items():
            saved = state_dict["state"][key][name]
            same = torch.equal(value, saved) if isinstance(value, Tensor) else value == saved
            assert same, f"{name} of parameter {key} changed"
    assert str(after["param_groups"]) == str(state_dict["param_groups"])
