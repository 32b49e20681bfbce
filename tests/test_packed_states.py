"""Per-parameter state that the torch backend keeps packed (adawarm.tensor_lists.PackedTensors):
the counters (``step``; schedule-free: ``weight_sum`` and ``lr_max`` too) of every group, and a
small group's schedule-free ``z`` and ``exp_avg_sq``. Each parameter of a group steps at its own
count; an entry changed between steps -- in place, or replaced by another tensor -- is the one
the next step reads, on every execution; a packed step computes what the unpacked one does; and
the groups packed are those the rule names."""

import copy

import pytest
import torch

import adawarm.optimizer_base
from adawarm import AdaWarm, AdaWarmScheduleFree
from tests.helpers import gradient_stream, make_params
from tests.promises import (
    KINDS,
    assert_identical,
    assert_matches,
    device_of,
    observe,
    on_device,
    optimizer_for,
    run,
)

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


def drawn(seed: int):
    """Starting parameters and STEPS steps of gradients of SHAPES, from ``seed``."""
    return (
        make_params(SHAPES, torch.float32, seed=seed),
        gradient_stream(SHAPES, torch.float32, STEPS, seed=seed + 1),
    )


def step_with(optimizer, params, grads, idle=frozenset()):
    for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
        param.grad = None if index in idle else grad.to(param.device, copy=True)
    optimizer.step()


@pytest.mark.parametrize(("kind", "execution"), executions())
def test_parameters_of_a_group_that_step_at_different_times_keep_their_own_counts(kind, execution):
    device, start, grads = device_of(execution), *drawn(seed=40)
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
    device, start, grads = device_of(execution), *drawn(seed=42)
    params = on_device(start, device)
    optimizer = optimizer_for(kind, params, execution, **SETTINGS)
    for step_grads in grads[:4]:
        step_with(optimizer, params, step_grads)
    states = [optimizer.state[param] for param in params]
    states[0]["step"] = torch.full_like(states[0]["step"], 20.0)  # replaced
    states[1]["step"].fill_(30.0)  # changed in place
    first_state = kind.state_keys[1]  # exp_avg or z
    states[2][first_state] = torch.full_like(states[2][first_state], 0.5)
    states[0]["exp_avg_sq"].fill_(0.25)
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


def schedule_free(params, **options):
    optimizer = AdaWarmScheduleFree(params, backend="torch", **{**SETTINGS, **options})
    optimizer.train()
    return optimizer


def packed(optimizer, params, key: str) -> bool:
    """Whether the parameters' ``key`` entries are views of one tensor, in order."""
    entries = [optimizer.state[param][key] for param in params]
    base = entries[0]._base
    return base is not None and all(entry._base is base for entry in entries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.0}, {"maximize": True}])
def test_a_packed_schedule_free_step_computes_what_the_unpacked_one_does(
    monkeypatch, dtype, options
):
    start = make_params(SHAPES, dtype, seed=44)
    grads = gradient_stream(SHAPES, dtype, STEPS, seed=45)
    seen = {}
    for limit in (adawarm.optimizer_base.PACKED_STATE_LIMIT, 0):
        monkeypatch.setattr(adawarm.optimizer_base, "PACKED_STATE_LIMIT", limit)
        params = on_device(start, torch.device("cpu"))
        optimizer = schedule_free(params, **options)
        run(optimizer, params, grads, evaluate_after=[3])
        assert packed(optimizer, params, "z") == (limit > 0)
        seen[limit] = observe(optimizer, params)
    assert_matches(seen[0], seen[adawarm.optimizer_base.PACKED_STATE_LIMIT], dtype)


def test_the_groups_whose_states_are_packed(monkeypatch):
    monkeypatch.setattr(adawarm.optimizer_base, "PACKED_STATE_LIMIT", 100)
    small = make_params([(5,), (3, 4)], torch.float32, seed=46)  # 17 elements
    large = make_params([(60,), (41,)], torch.float32, seed=47)  # 101
    low = make_params([(5,), (3, 4)], torch.bfloat16, seed=48)
    strided = [torch.randn(2, 2, 3, 4).to(memory_format=torch.channels_last).requires_grad_()]
    lone = make_params([(5,), (3, 4)], torch.float32, seed=49)
    groups = [small, large, low, strided]
    optimizer = schedule_free([{"params": group} for group in groups])
    warm = AdaWarm(lone, backend="torch")
    for group in [*groups, lone]:
        for param in group:
            param.grad = torch.ones_like(param)
    optimizer.step()
    warm.step()
    assert [packed(optimizer, group, "z") for group in groups] == [True, False, False, False]
    assert [packed(optimizer, group, "exp_avg_sq") for group in groups] == [
        True,
        False,
        False,
        False,
    ]
    # every group's counters, and AdaWarm's (whose moments the fused kernel updates)
    assert all(packed(optimizer, group, "step") for group in groups)
    assert packed(warm, lone, "step") and not packed(warm, lone, "exp_avg")
