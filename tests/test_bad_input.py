"""Bad input raises an error naming the value, before any parameter or state changes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adawarm import AdaWarm


def fresh_params():
    torch.manual_seed(0)
    return [torch.randn(5, requires_grad=True), torch.randn(2, 3, requires_grad=True)]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -1e-3}, ValueError, r"Invalid lr: -0.001"),
        ({"lr": math.nan}, ValueError, r"Invalid lr: nan"),
        ({"lr": "fast"}, TypeError, r"Invalid lr: 'fast'"),
        ({"eps": -1e-8}, ValueError, r"Invalid epsilon value: -1e-08"),
        ({"betas": (1.0, 0.999)}, ValueError, r"Invalid beta1: 1.0, expected 0 <= beta1 < 1"),
        ({"betas": (0.9, 1.5)}, ValueError, r"Invalid beta2: 1.5, expected 0 <= beta2 < 1"),
        ({"betas": (0.9, -0.1)}, ValueError, r"Invalid beta2: -0.1"),
        ({"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value: -0.1"),
        ({"warmup_steps": -1}, ValueError, r"Invalid warmup_steps: -1"),
        ({"warmup_steps": 2.5}, TypeError, r"Invalid warmup_steps: 2.5"),
        ({"warmup_steps": "tuned"}, ValueError, r"Invalid warmup_steps: 'tuned'"),
        ({"rectify": "yes"}, TypeError, r"Invalid rectify: 'yes'"),
        ({"total_steps": 0}, ValueError, r"Invalid total_steps: 0, expected None or an int >= 1"),
        ({"total_steps": 2.5}, ValueError, r"Invalid total_steps: 2.5"),
        (
            {"betas": (0.9, 0.5), "rectify": True},
            ValueError,
            r"Invalid beta2 for rectify=True: 0.5",
        ),
        ({"backend": "cuda"}, ValueError, r"Invalid backend: 'cuda'"),
    ],
)
def test_constructor_refuses_bad_hyper_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        AdaWarm(fresh_params(), **kwargs)


def test_rectify_off_accepts_a_small_beta2():
    AdaWarm(fresh_params(), betas=(0.9, 0.5), rectify=False)


def test_bad_param_group_is_refused_and_not_added():
    opt = AdaWarm(fresh_params()[:1])
    with pytest.raises(ValueError, match="Invalid warmup_steps: -3"):
        opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], "warmup_steps": -3})
    assert len(opt.param_groups) == 1


def snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(params, opt, before):
    before_params, before_state = before
    for p, q in zip(params, before_params, strict=True):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()
    assert after["state"].keys() == before_state["state"].keys()
    for key, state in after["state"].items():
        for name, value in state.items():
            assert torch.equal(value, before_state["state"][key][name]), name


def trained_optimizer():
    params = fresh_params()
    opt = AdaWarm(params, lr=1e-2, warmup_steps=3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return params, opt


def test_hyper_parameter_corrupted_between_steps_changes_nothing():
    params, opt = trained_optimizer()
    opt.add_param_group({"params": [torch.randn(4, requires_grad=True)]})
    opt.param_groups[1]["params"][0].grad = torch.ones(4)
    opt.param_groups[1]["lr"] = -5.0
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"Invalid lr: -5\.0"):
        opt.step()
    assert_unchanged(params, opt, before)


def test_sparse_gradient_changes_nothing():
    params, opt = trained_optimizer()
    before = snapshot(params, opt)
    params[1].grad = torch.ones(2, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    assert_unchanged(params, opt, before)


@pytest.mark.skipif(
    not hasattr(torch.Tensor, "grad_dtype"), reason="this torch refuses such gradients itself"
)
def test_gradient_of_wrong_dtype_is_refused():
    params, opt = trained_optimizer()
    params[0].grad_dtype = None  # torch refuses such a gradient unless told otherwise
    params[0].grad = torch.ones(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"dtype torch.float64 does not match"):
        opt.step()


def test_state_dict_with_other_group_count_is_refused():
    params, opt = trained_optimizer()
    saved = opt.state_dict()
    other = AdaWarm([{"params": params[:1]}, {"params": params[1:]}])
    with pytest.raises(ValueError, match="has 1 parameter groups, expected 2"):
        other.load_state_dict(saved)


def test_state_dict_with_other_group_size_is_refused():
    params, opt = trained_optimizer()
    saved = opt.state_dict()
    other = AdaWarm(params[:1])
    with pytest.raises(ValueError, match="has 2 parameters, expected 1"):
        other.load_state_dict(saved)


def test_state_dict_with_other_shapes_is_refused_and_changes_nothing():
    _, opt = trained_optimizer()
    saved = opt.state_dict()
    other_params = [torch.randn(5, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
    other = AdaWarm(other_params, lr=1e-2)
    for p in other_params:
        p.grad = torch.ones_like(p)
    other.step()
    before = snapshot(other_params, other)
    with pytest.raises(
        ValueError, match=r"exp_avg of parameter 1 has shape \(2, 3\), expected \(3, 2\)"
    ):
        other.load_state_dict(saved)
    assert_unchanged(other_params, other, before)


def test_state_dict_with_bad_hyper_parameters_is_refused():
    params, opt = trained_optimizer()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["betas"] = (0.9, 2.0)
    with pytest.raises(ValueError, match=r"Invalid beta2: 2\.0"):
        AdaWarm(params).load_state_dict(saved)


def test_amsgrad_state_dict_is_refused():
    params = fresh_params()
    saved = torch.optim.AdamW(params, amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad=True"):
        AdaWarm(params).load_state_dict(saved)


def test_zero_size_parameters_work():
    params = [torch.randn(0, requires_grad=True), torch.randn(3, 0, 2, requires_grad=True)]
    opt = AdaWarm(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
