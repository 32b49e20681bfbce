"""GPU-only checks of the Triton kernel: real concurrency, GradScaler with fp16, a compiled step.

The property tests of test_triton_kernel.py and the first-light cases of test_kernel_smoke.py
(CUDA-graph replay among them) also run on the GPU when one is present.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from adawarm import AdaWarm, adawarm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def twin_params(shapes, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    return (
        [b.cuda().requires_grad_() for b in base],
        [b.cuda().requires_grad_() for b in base],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_programs_per_tensor_advance_each_step_once(dtype):
    # Thousands of concurrent programs share each step counter: a race would show up here.
    shapes = [(1 << 22,), (12_345,), (0,), (1,), (3, 1024, 7)]
    mine, theirs = twin_params(shapes, dtype)
    opt_kernel = AdaWarm(mine, backend="triton", warmup_steps=3)
    opt_torch = AdaWarm(theirs, backend="torch", warmup_steps=3)
    for _ in range(12):
        for a, b in zip(mine, theirs, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_kernel.step()
        opt_torch.step()
    torch.cuda.synchronize()
    for a, b in zip(mine, theirs, strict=True):
        assert float(opt_kernel.state[a]["step"]) == 12.0
        assert_close(a.detach().cpu(), b.detach().cpu(), dtype, "param")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(opt_kernel.state[a][key].cpu(), opt_torch.state[b][key].cpu(), dtype, key)


def test_grad_scaler_fp16_training_loop_skips_inf_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    ).cuda()
    opt = AdaWarm(model.parameters(), lr=3e-3, warmup_steps=5, backend="triton")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    inputs = torch.randn(512, 64, device="cuda")
    targets = torch.randint(0, 10, (512,), device="cuda")
    losses, skipped = [], 0
    for step in range(60):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        if step in (10, 30):
            loss = loss * float("inf")
            skipped += 1
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    for p in model.parameters():
        assert float(opt.state[p]["step"]) == 60 - skipped
        assert torch.isfinite(p).all()
    assert losses[-1] < 0.5 * losses[0]


def test_compiled_training_step_with_the_functional_triton_step_matches_eager():
    # Forward, backward and the Triton step in one compiled function, through inductor.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(33, 65), torch.nn.Tanh(), torch.nn.Linear(65, 3)
        ).cuda()
        params = list(model.parameters())
        states = {
            "exp_avgs": [torch.zeros_like(p) for p in params],
            "exp_avg_sqs": [torch.zeros_like(p) for p in params],
            "state_steps": [torch.zeros((), device="cuda") for _ in params],
        }
        return model, params, states

    def train_step(model, params, states, inputs, targets, lr):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()  # a graph break: the step below is the second graph
        adawarm(
            params,
            [p.grad for p in params],
            **states,
            lr=lr,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.1,
            warmup_steps="auto",
            rectify=True,
            backend="triton",
        )
        for p in params:
            p.grad = None
        return loss.detach()

    counter = CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(train_step, backend=counter)
    eager, compiled = build(), build()
    generator = torch.Generator(device="cuda").manual_seed(1)
    frames_after_first_step = None
    for step in range(12):
        inputs = torch.randn(64, 33, device="cuda", generator=generator)
        targets = torch.randn(64, 3, device="cuda", generator=generator)
        lr = torch.tensor(1e-2 / (1 + step), device="cuda")
        train_step(*eager, inputs, targets, lr)
        compiled_step(*compiled, inputs, targets, lr)
        frames_after_first_step = frames_after_first_step or counter.frame_count
    torch.cuda.synchronize()
    assert counter.frame_count == frames_after_first_step, "recompiled"
    assert sum("torch.ops.adawarm.triton_step_" in graph.code for graph in counter.graphs) == 1
    for a, b in zip(compiled[1], eager[1], strict=True):
        assert_close(a.detach().cpu(), b.detach().cpu(), torch.float32, "param")
    for key in ("exp_avgs", "exp_avg_sqs", "state_steps"):
        for a, b in zip(compiled[2][key], eager[2][key], strict=True):
            assert_close(a.cpu(), b.cpu(), torch.float32, key)
