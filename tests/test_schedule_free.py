"""AdaWarmScheduleFree against schedulefree's AdamWScheduleFree and RAdamScheduleFree, and its
own rules: train/eval, checkpoints, skipped and failed steps, what a step reads and writes."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import ODD_SHAPES, assert_close, gradient_stream, make_params
from hypothesis import given
from hypothesis import strategies as st

from adawarm import AdaWarm, AdaWarmScheduleFree
from adawarm.schedule import SCHEDULE_FREE_RUN_FRACTION, rho

schedulefree = pytest.importorskip(
    "schedulefree", reason="the test extra: pip install -e '.[test]'"
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 32
# Where the parity runs switch to eval and back (as a training loop that evaluates would).
EVALUATIONS = (3, 11, 12, 25)
SETTINGS = {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}
# backend and torch implementation; the kernel takes fp32/bf16/fp16 parameters.
EXECUTIONS = {
    "torch reference": {"backend": "torch", "foreach": False},
    "torch foreach": {"backend": "torch", "foreach": True},
    "triton": {"backend": "triton"},
}


def trajectory(optimizer, params, grads, switch_at=EVALUATIONS):
    """Train ``optimizer`` over ``grads``, evaluating (eval, then train) after the steps in
    ``switch_at``; the parameters in train and in eval mode at the end, and the states."""
    optimizer.train()
    for index, step_grads in enumerate(grads):
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.to(param.device)
        optimizer.step()
        if index in switch_at:
            optimizer.eval()
            optimizer.train()
    at_y = [p.detach().clone() for p in params]
    optimizer.eval()
    at_x = [p.detach().clone() for p in params]
    states = [optimizer.state[p] for p in params]
    return at_y, at_x, states


def assert_same(ours, theirs, dtype):
    for name, mine, reference in zip(("y", "x"), ours[:2], theirs[:2], strict=True):
        for index, (a, b) in enumerate(zip(mine, reference, strict=True)):
            assert_close(a.cpu(), b.cpu(), dtype, f"{name} of parameter {index}")
    for index, (state, reference) in enumerate(zip(ours[2], theirs[2], strict=True)):
        if not reference:
            assert not state
            continue
        for key in ("z", "exp_avg_sq"):
            assert_close(state[key].cpu().to(dtype), reference[key], dtype, f"{key} {index}")


def schedulefree_trajectory(shapes, dtype, grads, **settings):
    params = make_params(shapes, dtype, 3)
    optimizer = schedulefree.AdamWScheduleFree(params, **settings)
    return trajectory(optimizer, params, grads)


@pytest.mark.parametrize(
    ("execution", "dtype"),
    [(execution, torch.float32) for execution in EXECUTIONS]
    # the Triton kernel takes fp32, bf16 and fp16 parameters
    + [(execution, torch.float64) for execution in EXECUTIONS if execution != "triton"],
    ids=str,
)
def test_equals_schedulefree_adamw_with_a_linear_ramp(execution, dtype):
    shapes = [s for s in ODD_SHAPES if s != (0,)] + [(0,)]
    grads = gradient_stream(shapes, dtype, STEPS, 3)
    options = {**SETTINGS, "warmup_steps": 7, "r": 0.5, "weight_lr_power": 2.0}
    params = [p.detach().to(DEVICE).requires_grad_() for p in make_params(shapes, dtype, 3)]
    ours = AdaWarmScheduleFree(params, **options, rectify=False, **EXECUTIONS[execution])
    result = trajectory(ours, params, grads)
    expected = schedulefree_trajectory(shapes, dtype, grads, **options)
    assert_same(result, expected, dtype)
    assert all(float(state["step"]) == STEPS for state in result[2])


@pytest.mark.parametrize(
    ("total_steps", "warmup_steps"),
    # schedulefree's recommended fraction of the run, or AdaWarm's 50 steps (beta2 0.99)
    [(400, round(SCHEDULE_FREE_RUN_FRACTION * 400)), (None, 50)],
)
def test_the_default_warmup_is_a_fraction_of_the_run_when_its_length_is_known(
    total_steps, warmup_steps
):
    shapes = [(1025,), (3, 7)]
    grads = gradient_stream(shapes, torch.float32, STEPS, 5)
    params = make_params(shapes, torch.float32, 3)
    ours = AdaWarmScheduleFree(params, **SETTINGS, total_steps=total_steps, backend="torch")
    result = trajectory(ours, params, grads)
    expected = schedulefree_trajectory(
        shapes, torch.float32, grads, **SETTINGS, warmup_steps=warmup_steps
    )
    assert_same(result, expected, torch.float32)


@given(
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.5, 0.99),
    beta2=st.floats(0.8, 0.9999),
    weight_decay=st.floats(0.0, 0.3),
    warmup_steps=st.integers(0, 40),
    r=st.sampled_from([0.0, 0.5, 1.0]),
    weight_lr_power=st.sampled_from([0.0, 1.0, 2.0, 2.5]),
)
def test_equals_schedulefree_over_its_hyper_parameters(
    lr, beta1, beta2, weight_decay, warmup_steps, r, weight_lr_power
):
    shapes, dtype = [(5,), (2, 3)], torch.float64
    grads = gradient_stream(shapes, dtype, STEPS, 5)
    options = {
        "lr": lr,
        "betas": (beta1, beta2),
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "r": r,
        "weight_lr_power": weight_lr_power,
    }
    params = make_params(shapes, dtype, 3)
    result = trajectory(AdaWarmScheduleFree(params, **options, backend="torch"), params, grads)
    assert_same(result, schedulefree_trajectory(shapes, dtype, grads, **options), dtype)


def test_rectified_it_is_radam_schedulefree_silent_where_torchs_radam_is():
    # RAdamScheduleFree takes an adaptive step once rho_t > 4, torch's RAdam (and AdaWarm) once
    # rho_t > 5: at beta2 = 0.999 that is step 5 alone (rho_5 = 4.996), where AdaWarmScheduleFree
    # is silent. RAdamScheduleFree with its rate set to 0 at that step is the same optimizer.
    beta2 = 0.999
    between = [t for t in range(1, STEPS + 1) if 4.0 < rho(t, beta2) <= 5.0]
    assert between == [5]
    shapes, dtype = [(7,), (3, 5)], torch.float64
    grads = gradient_stream(shapes, dtype, STEPS, 7)
    settings = {**SETTINGS, "betas": (0.9, beta2)}
    params = make_params(shapes, dtype, 3)
    ours = AdaWarmScheduleFree(params, **settings, warmup_steps=0, rectify=True, backend="torch")
    result = trajectory(ours, params, grads)

    def radam(silenced: bool):
        params = make_params(shapes, dtype, 3)
        optimizer = schedulefree.RAdamScheduleFree(params, **settings)
        optimizer.train()
        for index, step_grads in enumerate(grads):
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            optimizer.param_groups[0]["lr"] = 0.0 if silenced and index + 1 in between else 0.02
            optimizer.step()
            if index in EVALUATIONS:
                optimizer.eval()
                optimizer.train()
        at_y = [p.detach().clone() for p in params]
        optimizer.eval()
        return at_y, [p.detach().clone() for p in params], [optimizer.state[p] for p in params]

    assert_same(result, radam(silenced=True), dtype)
    with pytest.raises(AssertionError):  # as it is, RAdamScheduleFree moves at step 5
        assert_same(result, radam(silenced=False), dtype)


def fresh(shapes=((5,), (2, 3)), dtype=torch.float32, **options):
    params = [p.detach().to(DEVICE).requires_grad_() for p in make_params(shapes, dtype, 3)]
    return params, AdaWarmScheduleFree(params, **options)


def set_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(param)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_step_in_eval_mode_raises_naming_train_and_changes_nothing(backend):
    params, optimizer = fresh(backend=backend)
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"call optimizer\.train\(\)"):
        optimizer.step()  # a new optimizer is in eval mode, as schedulefree's
    assert not optimizer.state[params[0]]
    optimizer.train()
    optimizer.step()
    optimizer.eval()
    stepped = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, stepped, strict=True))
    assert str(optimizer.state_dict()) == str(state)
    assert not all(torch.equal(a, b) for a, b in zip(before, stepped, strict=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_train_and_eval_are_idempotent(backend):
    params, optimizer = fresh(backend=backend, lr=0.05, warmup_steps=2)
    optimizer.train()
    for seed in range(5):
        set_grads(params, seed)
        optimizer.step()
    optimizer.train()  # already in train mode: nothing moves
    at_y = [p.detach().clone() for p in params]
    optimizer.eval()
    at_x = [p.detach().clone() for p in params]
    optimizer.eval()
    assert all(torch.equal(a, b) for a, b in zip(params, at_x, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(at_x, at_y, strict=True))
    optimizer.train()
    for a, b in zip(params, at_y, strict=True):
        assert_close(a.detach(), b, torch.float32, "y after eval and train")


def test_groups_without_gradients_and_groups_added_later():
    params, optimizer = fresh(backend="torch")
    frozen = torch.zeros(4, device=DEVICE, requires_grad=True)
    optimizer.add_param_group({"params": [frozen], "lr": 0.1})
    optimizer.train()
    set_grads(params, 0)
    optimizer.step()
    assert not optimizer.state[frozen]  # no gradient: no state, no change
    late = torch.ones(3, device=DEVICE, requires_grad=True)
    optimizer.add_param_group({"params": [late], "warmup_steps": 0})
    assert optimizer.param_groups[-1]["train_mode"] is False  # a new group starts in eval mode
    with pytest.raises(RuntimeError, match=r"group 2.*optimizer\.train\(\)"):
        optimizer.step()
    optimizer.train()
    late.grad = torch.ones(3, device=DEVICE)
    optimizer.step()
    assert float(optimizer.state[late]["step"]) == 1.0
    assert float(optimizer.state[params[0]]["step"]) == 2.0


def test_fused_on_the_cpu_is_refused_before_any_change():
    params, optimizer = fresh(backend=None, fused=True)
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU fused=True is the Triton kernel")
    optimizer.train()
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match="no fused PyTorch kernel"):
        optimizer.step()
    assert not optimizer.state[params[0]]


def continued(optimizer, params, grads, evaluate_at=(2,)):
    """Train on from where ``optimizer`` stands (in train mode), evaluating after the steps in
    ``evaluate_at``; the parameters at the end, in eval mode."""
    optimizer.train()
    for index, step_grads in enumerate(grads):
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        if index in evaluate_at:
            optimizer.eval()
            optimizer.train()
    optimizer.eval()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("source", ["AdamWScheduleFree", "RAdamScheduleFree"])
def test_a_schedulefree_checkpoint_saved_in_eval_mode_loads_and_continues_identically(source):
    shapes, dtype = [(7,), (3, 5)], torch.float64
    grads = gradient_stream(shapes, dtype, 20, 11)
    rectified = source == "RAdamScheduleFree"
    settings = {**SETTINGS, "betas": (0.9, 0.999)}
    if not rectified:
        settings["warmup_steps"] = 4
    params = make_params(shapes, dtype, 3)
    theirs = getattr(schedulefree, source)(params, **settings)
    continued(theirs, params, grads[:10])  # saved in eval mode, as schedulefree's README asks
    model = copy.deepcopy([p.detach() for p in params])
    saved = copy.deepcopy(theirs.state_dict())
    expected = continued(theirs, params, grads[10:])

    mine = [p.clone().requires_grad_() for p in model]
    options = {"warmup_steps": 0, "rectify": True} if rectified else {}
    optimizer = AdaWarmScheduleFree(mine, backend="torch", **options)
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["train_mode"] is False  # the mode came with it
    assert optimizer.param_groups[0]["lr"] == SETTINGS["lr"]  # and the hyper-parameters
    assert {float(s["step"]) for s in optimizer.state.values()} == {10.0}
    result = continued(optimizer, mine, grads[10:])
    for index, (a, b) in enumerate(zip(result, expected, strict=True)):
        assert_close(a, b, dtype, f"parameter {index} after resuming")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("saved_in", ["train", "eval"])
def test_its_own_checkpoint_round_trips_whichever_mode_it_was_saved_in(backend, saved_in):
    shapes = [(7,), (1025,)]
    grads = gradient_stream(shapes, torch.float32, 12, 13)

    def build(values):
        params = [v.detach().clone().to(DEVICE).requires_grad_() for v in values]
        return params, AdaWarmScheduleFree(params, lr=0.01, warmup_steps=3, backend=backend)

    params, optimizer = build(make_params(shapes, torch.float32, 3))
    continued(optimizer, params, [[g.to(DEVICE) for g in step] for step in grads[:6]])
    if saved_in == "train":
        optimizer.train()
    # the model's and the optimizer's state_dicts, saved together
    model = [p.detach().cpu().clone() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    later = [[g.to(DEVICE) for g in step] for step in grads[6:]]
    expected = continued(optimizer, params, later)
    resumed, fresh_optimizer = build(model)
    fresh_optimizer.load_state_dict(saved)
    assert fresh_optimizer.param_groups[0]["train_mode"] is (saved_in == "train")
    for a, b in zip(continued(fresh_optimizer, resumed, later), expected, strict=True):
        assert torch.equal(a, b)


def test_the_default_weight_decay_is_adawarms_and_adamws():
    # Swapping AdaWarm (or AdamW) for AdaWarmScheduleFree keeps the decay (docs/defaults.md).
    defaults = {
        optimizer: inspect.signature(optimizer).parameters["weight_decay"].default
        for optimizer in (AdaWarmScheduleFree, AdaWarm, torch.optim.AdamW)
    }
    assert set(defaults.values()) == {0.01}, defaults
    _, optimizer = fresh()
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_an_adamw_checkpoint_is_refused_naming_what_loads():
    params = [torch.zeros(3, requires_grad=True)]
    adamw = torch.optim.AdamW(params)
    params[0].grad = torch.ones(3)
    adamw.step()
    optimizer = AdaWarmScheduleFree(params)
    with pytest.raises(ValueError, match="not a schedule-free checkpoint"):
        optimizer.load_state_dict(adamw.state_dict())
