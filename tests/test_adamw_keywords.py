"""torch.optim.AdamW's constructor keywords mean what a torch user expects of them."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ODD_SHAPES,
    assert_same_trajectory_state,
    count_calls,
    gradient_stream,
    make_params,
    non_contiguous_randn,
    train,
)

from adawarm import AdaWarm, torch_backend

HP = {"lr": 1e-2, "eps": 1e-8, "weight_decay": 0.1}
STEPS = 8
LIMIT = {"rectify": False, "warmup_steps": 0}


def trained_pair(make_adawarm, make_adamw, betas=(0.9, 0.999), dtype=torch.float32):
    grads = gradient_stream(ODD_SHAPES, dtype, STEPS, seed=5)
    mine, theirs = make_params(ODD_SHAPES, dtype, 5), make_params(ODD_SHAPES, dtype, 5)
    opt_mine, opt_theirs = make_adawarm(mine, betas), make_adamw(theirs, betas)
    train(opt_mine, mine, grads)
    train(opt_theirs, theirs, grads)
    return opt_mine, mine, opt_theirs, theirs


def count_bucket_calls(monkeypatch, implementation: str) -> list[str]:
    """Record each call of one of the torch backend's implementations."""
    if implementation == "fused":
        return count_calls(monkeypatch, torch_backend, "_fused_bucket")
    calls: list[str] = []
    original = torch_backend._BUCKET_STEPS[implementation]

    def counted(*args, **kwargs):
        calls.append(implementation)
        return original(*args, **kwargs)

    monkeypatch.setitem(torch_backend._BUCKET_STEPS, implementation, counted)
    return calls


@pytest.mark.parametrize(
    ("selection", "implementation"),
    [
        ({"foreach": True}, "foreach"),
        ({"foreach": False}, "reference"),
        ({"fused": True}, "fused"),
        ({"fused": False}, "foreach"),
        ({"foreach": False, "fused": False}, "reference"),
        ({}, "fused"),  # automatic: torch's fused kernel on the CPU
    ],
)
def test_foreach_and_fused_select_the_implementation_and_match_adamw(
    monkeypatch, selection, implementation
):
    calls = count_bucket_calls(monkeypatch, implementation)
    # Against AdamW's single-tensor implementation: torch's fused CPU AdamW mis-updates the
    # strided gradients these tests use (AdaWarm copies them to contiguous memory first).
    opt_mine, mine, opt_theirs, theirs = trained_pair(
        lambda ps, betas: AdaWarm(ps, **HP, betas=betas, **LIMIT, **selection),
        lambda ps, betas: torch.optim.AdamW(ps, **HP, betas=betas, foreach=False),
    )
    assert len(calls) == STEPS
    assert_same_trajectory_state(opt_mine, mine, opt_theirs, theirs, torch.float32)


def test_amsgrad_is_accepted_where_adamw_takes_it_positionally():
    params = make_params([(3,)], torch.float32, 0)
    AdaWarm(params, 1e-3, (0.9, 0.999), 1e-8, 1e-2, False)  # AdamW's positional order


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"amsgrad": True}, ValueError, r"Invalid amsgrad: True; AdaWarm has no AMSGrad"),
        ({"differentiable": True}, ValueError, r"Invalid differentiable: True"),
        ({"foreach": True, "fused": True}, ValueError, r"foreach=True with fused=True"),
        ({"foreach": 1}, TypeError, r"Invalid foreach: 1, expected None, True or False"),
        ({"fused": "yes"}, TypeError, r"Invalid fused: 'yes'"),
        ({"foreach": True, "backend": "triton"}, ValueError, r"foreach=True with backend='triton'"),
        ({"fused": False, "capturable": True}, ValueError, r"capturable=True with fused=False"),
    ],
)
def test_options_without_an_algorithm_or_contradicting_each_other_are_refused(
    kwargs, error, message
):
    with pytest.raises(error, match=message):
        AdaWarm(make_params([(3,)], torch.float32, 0), **kwargs)


def test_a_param_group_asking_for_amsgrad_is_refused():
    opt = AdaWarm(make_params([(3,)], torch.float32, 0))
    with pytest.raises(ValueError, match="Invalid amsgrad: True"):
        opt.add_param_group({"params": make_params([(2,)], torch.float32, 1), "amsgrad": True})
    assert len(opt.param_groups) == 1


def test_fused_refuses_strided_parameters_that_torchs_fused_kernel_would_mis_update():
    param = non_contiguous_randn((3, 5), torch.float32, torch.Generator().manual_seed(0))
    param.requires_grad_()
    param.grad = torch.ones(3, 5)
    with pytest.raises(RuntimeError, match=r"fused=True: a parameter of shape \(3, 5\)"):
        AdaWarm([param], fused=True).step()
    before = param.detach().clone()
    AdaWarm([param]).step()  # the automatic choice updates it through foreach ops
    assert not torch.equal(param.detach(), before)


def test_fused_on_a_device_without_a_fused_kernel_says_so():
    param = torch.zeros(3, device="meta", requires_grad=True)
    param.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"fused=True: no fused kernel serves tensors on meta"):
        AdaWarm([param], fused=True).step()


def test_fused_with_backend_triton_on_the_cpu_runs_the_interpreted_kernel(monkeypatch):
    from adawarm.kernels import adawarm_step

    launches = count_calls(monkeypatch, adawarm_step, "launch_adawarm_step")
    params = make_params([(5,)], torch.float32, 0)
    params[0].grad = torch.ones(5)
    AdaWarm(params, fused=True, backend="triton").step()
    assert launches == ["launch_adawarm_step"]


def tensor_betas(betas):
    return tuple(torch.tensor(beta) for beta in betas)


@pytest.mark.parametrize("rectify", [False, True])
def test_tensor_betas_train_like_adamw_with_tensor_betas(rectify):
    # torch keeps tensor betas in fp32, so both sides use the same (fp32-rounded) values.
    make_torch = torch.optim.RAdam if rectify else torch.optim.AdamW
    extra = {"decoupled_weight_decay": True} if rectify else {}
    opt_mine, mine, opt_theirs, theirs = trained_pair(
        lambda ps, betas: AdaWarm(
            ps, **HP, betas=tensor_betas(betas), rectify=rectify, warmup_steps=0
        ),
        lambda ps, betas: make_torch(ps, **HP, betas=tensor_betas(betas), **extra),
    )
    assert_same_trajectory_state(opt_mine, mine, opt_theirs, theirs, torch.float32)


def test_tensor_betas_changed_in_place_take_effect_at_the_next_step():
    params = make_params([(4,)], torch.float32, 0)
    betas = tensor_betas((0.9, 0.999))
    opt = AdaWarm(params, betas=betas, warmup_steps=0)
    params[0].grad = torch.ones(4)
    opt.step()
    betas[0].fill_(0.0)  # plain RMSProp-like momentum from now on: exp_avg = grad
    params[0].grad = torch.full((4,), 3.0)
    opt.step()
    assert torch.equal(opt.state[params[0]]["exp_avg"], torch.full((4,), 3.0))


@pytest.mark.parametrize(
    ("betas", "message"),
    [
        (
            (torch.tensor([0.9, 0.8]), torch.tensor(0.999)),
            r"Invalid beta1: a tensor of shape \(2,\)",
        ),
        ((torch.tensor(0.9), torch.tensor(1.5)), r"Invalid beta2: tensor\(1.5000\)"),
    ],
)
def test_bad_tensor_betas_are_refused(betas, message):
    with pytest.raises(ValueError, match=message):
        AdaWarm(make_params([(3,)], torch.float32, 0), betas=betas)
