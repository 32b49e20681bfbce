"""torch.optim.AdamW's constructor keywords mean what a torch user expects of them."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ODD_SHAPES,
    assert_same_trajectory_state,
    gradient_stream,
    make_params,
    non_contiguous_randn,
    train,
)

from adawarm import AdaWarm

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


def test_amsgrad_is_accepted_where_adamw_takes_it_positionally():
    params = make_params([(3,)], torch.float32, 0)
    AdaWarm(params, 1e-3, (0.9, 0.999), 1e-8, 1e-2, False)  # AdamW's positional order


def test_fused_refuses_strided_parameters_that_torchs_fused_kernel_would_mis_update():
    param = non_contiguous_randn((3, 5), torch.float32, torch.Generator().manual_seed(0))
    param.requires_grad_()
    param.grad = torch.ones(3, 5)
    with pytest.raises(RuntimeError, match=r"fused=True: a parameter of shape \(3, 5\)"):
        AdaWarm([param], fused=True).step()
    before = param.detach().clone()
    AdaWarm([param]).step()  # the automatic choice updates it through foreach ops
    assert not torch.equal(param.detach(), before)


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
