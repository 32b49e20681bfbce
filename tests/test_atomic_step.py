"""A step is all or nothing: a failure inside a backend leaves parameters, moments, Kahan
buffers and step counters as they were before the step."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_params

from adawarm import AdaWarm, torch_backend
from adawarm.kernels import adawarm_step

ROOT = Path(__file__).resolve().parent.parent


class InjectedFailure(Exception):
    pass


# Where each backend launches its update, and the options that select it.
BACKENDS = {
    "torch reference": ({"backend": "torch", "foreach": False}, "reference"),
    "torch foreach": ({"backend": "torch", "foreach": True}, "foreach"),
    "torch fused": ({"backend": "torch", "fused": True}, "fused"),
    "triton": ({"backend": "triton"}, "triton"),
}


def fail_launches(monkeypatch, launch_point: str, *, after: int, run_first: bool = False):
    """Make the backend's launch raise from its ``after + 1``-th call on; with ``run_first`` the
    failing launch runs (changing tensors) before it raises, like a kernel error midway."""
    if launch_point == "triton":
        owner, name = adawarm_step, "launch_adawarm_step"
        original = adawarm_step.launch_adawarm_step
    elif launch_point == "fused":
        owner, name = torch_backend, "_fused_bucket"
        original = torch_backend._fused_bucket
    else:
        owner, name = torch_backend._BUCKET_STEPS, launch_point
        original = torch_backend._BUCKET_STEPS[launch_point]
    calls = []

    def launch(*args, **kwargs):
        calls.append(name)
        if len(calls) <= after:
            return original(*args, **kwargs)
        if run_first:
            original(*args, **kwargs)
        raise InjectedFailure("injected launch failure")

    if isinstance(owner, dict):
        monkeypatch.setitem(owner, name, launch)
    else:
        monkeypatch.setattr(owner, name, launch)
    return calls


def two_group_optimizer(options, **extra):
    params = make_params([(7,), (3, 5), (1025,)], torch.float32, seed=3)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0}]
    opt = AdaWarm(groups, lr=1e-2, warmup_steps=2, **options, **extra)
    return params, opt


def set_gradients(params, step):
    generator = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


def everything(params, opt):
    """Parameters and the whole state, copied."""
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_same(actual, expected):
    for mine, theirs in zip(actual[0], expected[0], strict=True):
        assert torch.equal(mine, theirs), "a parameter changed"
    assert actual[1].keys() == expected[1].keys(), "states were created or removed"
    for index, state in actual[1].items():
        assert state.keys() == expected[1][index].keys()
        for key, value in state.items():
            assert torch.equal(value, expected[1][index][key]), f"{key} of parameter {index}"


def trained(options, steps, **extra):
    params, opt = two_group_optimizer(options, **extra)
    for step in range(steps):
        set_gradients(params, step)
        opt.step()
    return params, opt


@pytest.mark.parametrize("run_first", [False, True], ids=["at-launch", "midway"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_first_step_changes_nothing_and_can_be_retried(monkeypatch, backend, run_first):
    options, launch_point = BACKENDS[backend]
    params, opt = two_group_optimizer(options)
    set_gradients(params, 0)
    before = everything(params, opt)
    # The first group's launch succeeds; the second group's fails.
    fail_launches(monkeypatch, launch_point, after=1, run_first=run_first)
    with pytest.raises(RuntimeError, match="as they were before the step") as raised:
        opt.step()
    assert isinstance(raised.value.__cause__, InjectedFailure)
    assert_same(everything(params, opt), before)
    assert not opt.state, "the states this step created are removed"

    monkeypatch.undo()
    opt.step()
    expected_params, expected = trained(options, 1)
    assert_same(everything(params, opt), everything(expected_params, expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_step_of_a_new_configuration_is_rolled_back(monkeypatch, backend):
    options, launch_point = BACKENDS[backend]
    params, opt = trained(options, 7)  # past the rectification threshold
    extra = make_params([(4,)], torch.float32, seed=9)
    opt.add_param_group({"params": extra})
    set_gradients([*params, *extra], 7)
    before = everything([*params, *extra], opt)
    fail_launches(monkeypatch, launch_point, after=2, run_first=True)  # the new group's launch
    with pytest.raises(RuntimeError, match="as they were before the step"):
        opt.step()
    assert_same(everything([*params, *extra], opt), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_that_cannot_launch_later_changes_nothing(monkeypatch, backend):
    options, launch_point = BACKENDS[backend]
    params = make_params([(7,), (1023,)], torch.float32, seed=4)
    opt = AdaWarm(params, lr=1e-2, warmup_steps=2, rectify=True, **options)
    for step in range(7):
        set_gradients(params, step)
        opt.step()
    set_gradients(params, 7)
    before = everything(params, opt)
    fail_launches(monkeypatch, launch_point, after=0)
    with pytest.raises(InjectedFailure):
        opt.step()
    assert_same(everything(params, opt), before)


def test_the_error_of_a_failed_triton_step_names_the_way_out(monkeypatch):
    params, opt = two_group_optimizer({"backend": "triton"})
    set_gradients(params, 0)
    fail_launches(monkeypatch, "triton", after=0)
    with pytest.raises(RuntimeError, match=r"triton backend .*pass backend='torch'"):
        opt.step()


INTERPRETER_TOO_LATE = """
import os, sys, torch
import triton  # imported, as torch.compile would, before the variable is set
os.environ["TRITON_INTERPRET"] = "1"
import adawarm
param = torch.nn.Parameter(torch.ones(5))
param.grad = torch.ones(5)
opt = adawarm.AdaWarm([param], backend="triton")
try:
    opt.step()
except RuntimeError as error:
    print(error)
print(torch.equal(param.detach(), torch.ones(5)), dict(opt.state))
"""


def test_an_interpreter_enabled_after_triton_was_imported_is_refused_before_any_change():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_TOO_LATE],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    message, unchanged = result.stdout.strip().split("\n")
    assert "TRITON_INTERPRET=1 was set after triton was imported" in message
    assert "before anything imports triton" in message
    assert unchanged == "True {}"
