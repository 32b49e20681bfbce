"""Per-parameter counters (``step``; schedule-free: ``weight_sum`` and ``lr_max`` too): each
parameter of a group steps at its own count, and a count changed between steps -- in place, or
replaced by another tensor -- is the one the next step reads, on every execution (the torch
backend reads and advances a group's counters as one packed tensor: adawarm.tensor_lists)."""

import copy

import pytest
import torch

from tests.helpers import gradient_stream, make_params
from tests.promises import KINDS, assert_identical, device_of, observe, on_device, optimizer_for

SHAPES = [(5,), (3, 4), (7,)]
STEPS = 8
# Per step, the parameters that have no gradient (so they do not step).
IDLE = {2: {1}, 3: {1}, 5: {2}}
SETTINGS = {"lr": 0.05, "warmup_steps": 4, "weight_decay": 0.01}


def executions():
    return [
        pytest.param(kind, execution, id=f"{kind.name}-{execution}")
        for kind in KINDS
        for execution in kind.executions
    ]


def step_with(optimizer, params, grads, idle=frozenset()):
    for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
        param.grad = None if index in idle else grad.to(param.device, copy=True)
    optimizer.step()


@pytest.mark.parametrize(("kind", "execution"), executions())
def test_parameters_of_a_group_that_step_at_different_times_keep_their_own_counts(kind, execution):
    device = device_of(execution)
    start = make_params(SHAPES, torch.float32, seed=40)
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=41)
    params = on_device(start, device)
    together = optimizer_for(kind, params, execution, **SETTINGS)
    # Each parameter alone in its own optimizer, stepped when it has a gradient.
    alone = [
        (param, optimizer_for(kind, [param], execution, **SETTINGS))
        for param in on_device(start, device)
    ]
    for index, step_grads in enumerate(grads):
        idle = IDLE.get(index, set())
        step_with(together, params, step_grads, idle)
        for position, ((param, optimizer), grad) in enumerate(zip(alone, step_grads, strict=True)):
            if position not in idle:
                step_with(optimizer, [param], [grad])
    expected = {}
    for position, (param, optimizer) in enumerate(alone):
        for name, value in observe(optimizer, [param]).items():
            expected[name.replace(" 0", f" {position}")] = value
    seen = observe(together, params)
    assert [float(seen[f"step {i}"]) for i in range(3)] == [STEPS, STEPS - 2, STEPS - 1]
    assert_identical(seen, expected)


@pytest.mark.parametrize(("kind", "execution"), executions())
def test_a_count_changed_between_steps_is_the_one_the_next_step_reads(kind, execution):
    device = device_of(execution)
    start = make_params(SHAPES, torch.float32, seed=42)
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=43)
    params = on_device(start, device)
    optimizer = optimizer_for(kind, params, execution, **SETTINGS)
    for step_grads in grads[:4]:
        step_with(optimizer, params, step_grads)
    states = [optimizer.state[param] for param in params]
    states[0]["step"] = torch.full_like(states[0]["step"], 20.0)  # replaced
    states[1]["step"].fill_(30.0)  # changed in place
    # The same states in a fresh optimizer, which has never stepped them.
    copies = on_device(params, device)
    fresh = optimizer_for(kind, copies, execution, **SETTINGS)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for step_grads in grads[4:]:
        step_with(optimizer, params, step_grads)
        step_with(fresh, copies, step_grads)
    seen = observe(optimizer, params)
    assert [float(seen[f"step {i}"]) for i in range(3)] == [24.0, 34.0, 8.0]
    assert_identical(seen, observe(fresh, copies))
