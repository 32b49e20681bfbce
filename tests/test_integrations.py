"""AdaWarm with the tools around training: LR schedulers, torch.compile, Hugging Face Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_bit_identical, assert_close, gradient_stream, make_params

from adawarm import AdaWarm
from adawarm.schedule import ramp

SHAPES = [(7,), (3, 5), (1025,)]
STEPS = 20
WARMUP = 6

SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-2, total_steps=STEPS
    ),
    "linear-then-cosine": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 5),
        ],
        milestones=[5],
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_compose_multiplicatively_with_the_ramp(name):
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=51)
    mine, theirs = make_params(SHAPES, torch.float32, 51), make_params(SHAPES, torch.float32, 51)
    opt_mine = AdaWarm(mine, lr=1e-2, warmup_steps=WARMUP, rectify=False)
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2)
    sched_mine, sched_theirs = SCHEDULERS[name](opt_mine), SCHEDULERS[name](opt_theirs)
    for step, step_grads in enumerate(grads, start=1):
        for p, q, g in zip(mine, theirs, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_mine.step()
        # The documented composition: the rate used is the scheduler's rate times the ramp.
        group = opt_theirs.param_groups[0]
        scheduled = group["lr"]
        group["lr"] = scheduled * ramp(step, WARMUP)
        opt_theirs.step()
        group["lr"] = scheduled
        sched_mine.step()
        sched_theirs.step()
    for p, q in zip(mine, theirs, strict=True):
        assert_close(p.detach(), q.detach(), torch.float32, name)
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(opt_mine.state[p][key], opt_theirs.state[q][key], torch.float32, key)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_resuming_optimizer_and_scheduler_continues_exactly(name):
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=52)

    def run(stop_at):
        params = make_params(SHAPES, torch.float32, 52)
        opt = AdaWarm(params, lr=1e-2, warmup_steps=WARMUP, rectify=True)
        sched = SCHEDULERS[name](opt)
        for index, step_grads in enumerate(grads):
            if index == stop_at:
                saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
                opt = AdaWarm(params, lr=1e-2, warmup_steps=WARMUP, rectify=True)
                sched = SCHEDULERS[name](opt)
                opt.load_state_dict(saved[0])
                sched.load_state_dict(saved[1])
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
            sched.step()
        return [p.detach() for p in params]

    assert_bit_identical(run(stop_at=8), run(stop_at=-1))


def test_compiled_training_step_matches_eager_and_does_not_recompile_on_lr_change():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        opt = AdaWarm(model.parameters(), lr=torch.tensor(1e-2), warmup_steps=3, backend="torch")
        return model, opt

    def step(model, opt, inputs, targets):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    counter = CompileCounter()
    eager_model, eager_opt = build()
    compiled_model, compiled_opt = build()
    compiled_step = torch.compile(step, backend=counter)
    generator = torch.Generator().manual_seed(1)
    frames_after_warmup = None
    for index in range(10):
        inputs, targets = (
            torch.randn(8, 6, generator=generator),
            torch.randn(8, 2, generator=generator),
        )
        if index >= 4:
            for opt in (eager_opt, compiled_opt):
                opt.param_groups[0]["lr"].fill_(1e-2 / (index - 2))
        step(eager_model, eager_opt, inputs, targets)
        compiled_step(compiled_model, compiled_opt, inputs, targets)
        if index == 3:
            frames_after_warmup = counter.frame_count
    assert counter.frame_count > 0
    assert counter.frame_count == frames_after_warmup, "a learning-rate change recompiled"
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        assert_close(p.detach(), q.detach(), torch.float32, "compiled vs eager")


def test_hugging_face_trainer_trains_with_adawarm(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    optimizer = AdaWarm(model.parameters(), lr=3e-3, warmup_steps=2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
    )
    trainer = transformers.Trainer(
        model=model, args=arguments, train_dataset=dataset, optimizers=(optimizer, scheduler)
    )
    trainer.train()
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {5.0}
