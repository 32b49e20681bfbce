"""AdaWarm with the tools around training: LR schedulers, torch.compile, Hugging Face Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_bit_identical, assert_close, gradient_stream, make_params

from adawarm import AdaWarm, AdaWarmScheduleFree
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


# Schedulers that warm up themselves: their rate at the first step is below their initial_lr.
WARMING_SCHEDULERS = {
    "one-cycle": SCHEDULERS["one-cycle"],
    "linear-then-cosine": SCHEDULERS["linear-then-cosine"],
    # transformers' get_linear_schedule_with_warmup(opt, 5, STEPS), written out
    "hugging-face-linear": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / 5 if s < 5 else max(0.0, (STEPS - s) / (STEPS - 5))
    ),
}


def train_under(make_optimizer, make_scheduler, seed=53):
    grads = gradient_stream(SHAPES, torch.float32, STEPS, seed=seed)
    params = make_params(SHAPES, torch.float32, seed)
    optimizer = make_optimizer(params)
    scheduler = make_scheduler(optimizer)
    rates = []
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        if isinstance(optimizer, AdaWarm):
            rates.append(optimizer.effective_lr()[0])
        optimizer.step()
        scheduler.step()
    return params, optimizer, rates


@pytest.mark.parametrize("name", list(WARMING_SCHEDULERS))
def test_the_default_ramp_steps_aside_for_a_scheduler_that_warms_up(name):
    make_scheduler = WARMING_SCHEDULERS[name]
    with pytest.warns(UserWarning, match="group 0 warms up itself"):
        mine, opt_mine, rates = train_under(lambda ps: AdaWarm(ps, lr=1e-2), make_scheduler)
    theirs, _, _ = train_under(lambda ps: torch.optim.AdamW(ps, lr=1e-2), make_scheduler)
    assert opt_mine.param_groups[0]["warmup_steps"] == 0
    for p, q in zip(mine, theirs, strict=True):
        assert_close(p.detach(), q.detach(), torch.float32, name)
    # The rate reported for logging is the scheduler's: nothing else scales the step.
    assert rates == pytest.approx(_scheduled_rates(make_scheduler), rel=1e-12)


def _scheduled_rates(make_scheduler) -> list[float]:
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-2)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_default_ramp_stays_under_a_scheduler_without_warmup():
    _, opt_mine, rates = train_under(lambda ps: AdaWarm(ps, lr=1e-2), SCHEDULERS["cosine"])
    assert opt_mine.param_groups[0]["warmup_steps"] == "auto"
    cosine = _scheduled_rates(SCHEDULERS["cosine"])
    # beta2 = 0.999: a 50-step ramp, times the scheduler's rate
    assert rates == pytest.approx([r * step / 50 for step, r in enumerate(cosine, 1)], rel=1e-12)


def test_an_explicit_ramp_is_kept_under_a_scheduler_that_warms_up():
    _, opt_mine, rates = train_under(
        lambda ps: AdaWarm(ps, lr=1e-2, warmup_steps=WARMUP), WARMING_SCHEDULERS["one-cycle"]
    )
    assert opt_mine.param_groups[0]["warmup_steps"] == WARMUP
    one_cycle = _scheduled_rates(WARMING_SCHEDULERS["one-cycle"])
    assert rates == pytest.approx(
        [r * ramp(step, WARMUP) for step, r in enumerate(one_cycle, 1)], rel=1e-12
    )


def test_total_steps_sets_the_default_ramp_per_group():
    params = make_params([(3,), (4,)], torch.float32, 56)
    opt = AdaWarm([{"params": params[:1]}, {"params": params[1:], "total_steps": 4000}], lr=1e-2)
    assert opt.effective_lr() == pytest.approx([1e-2 / 50, 1e-2 / 200])


def test_a_group_added_later_ramps_from_its_own_first_step():
    params = make_params([(3,)], torch.float32, 54)
    opt = AdaWarm(params, lr=1e-2)
    for _ in range(60):
        params[0].grad = torch.ones(3)
        opt.step()
    late = make_params([(4,)], torch.float32, 55)
    opt.add_param_group({"params": late})
    late[0].grad = torch.ones(4)
    assert opt.effective_lr() == pytest.approx([1e-2, 1e-2 / 50])


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


@pytest.mark.parametrize(
    "optimizer_class", [AdaWarm, AdaWarmScheduleFree], ids=lambda c: c.__name__
)
def test_compiled_training_step_matches_eager_and_does_not_recompile_on_lr_change(
    optimizer_class,
):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        opt = optimizer_class(
            model.parameters(), lr=torch.tensor(1e-2), warmup_steps=3, backend="torch"
        )
        if isinstance(opt, AdaWarmScheduleFree):
            opt.train()
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


def test_hugging_face_trainer_trains_with_adawarm_and_logs_the_rate_it_uses(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    logged = []

    # The example of docs/warmup.md, with a list to look at instead of a logger.
    class LogAdaWarmRate(transformers.TrainerCallback):
        """Logs the rate AdaWarm applies at each step as "adawarm_lr"."""

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            self.rate = optimizer.effective_lr()[0]

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs["adawarm_lr"] = self.rate
            logged.append(dict(logs))

    optimizer = AdaWarm(model.parameters(), lr=3e-3)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 2, 6)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        optimizers=(optimizer, scheduler),
        callbacks=[LogAdaWarmRate()],
    )
    with pytest.warns(UserWarning, match="warms up itself"):
        trainer.train()
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {5.0}
    assert optimizer.param_groups[0]["warmup_steps"] == 0  # the scheduler's warmup alone
    rates = [(entry["learning_rate"], entry["adawarm_lr"]) for entry in logged if "loss" in entry]
    assert len(rates) == 5
    assert all(float(trainer) == pytest.approx(float(used)) for trainer, used in rates)


def test_hugging_face_trainer_switches_adawarm_schedule_free_as_it_does_schedulefree(tmp_path):
    # The Trainer calls optimizer.train() before each training step and optimizer.eval() before
    # evaluating, for any optimizer that has them: AdaWarmScheduleFree goes through the same
    # run as schedulefree's AdamWScheduleFree and ends at the same point.
    transformers = pytest.importorskip("transformers")
    schedulefree = pytest.importorskip("schedulefree")
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]

    def train(make_optimizer):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        optimizer = make_optimizer(model.parameters())
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=6,
            per_device_train_batch_size=8,
            eval_strategy="steps",
            eval_steps=2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        )
        trainer = transformers.Trainer(
            model=model,
            args=arguments,
            train_dataset=dataset,
            eval_dataset=dataset[:8],
            # schedule-free: a constant rate (the Trainer's default would decay it linearly)
            optimizers=(optimizer, transformers.get_constant_schedule(optimizer)),
        )
        trainer.train()
        return model, optimizer

    settings = {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.01}
    ours, optimizer = train(lambda ps: AdaWarmScheduleFree(ps, **settings, backend="torch"))
    theirs, reference = train(lambda ps: schedulefree.AdamWScheduleFree(ps, **settings))
    assert optimizer.param_groups[0]["train_mode"] is False  # evaluated after the last step
    assert reference.param_groups[0]["train_mode"] is False
    assert {float(state["step"]) for state in optimizer.state.values()} == {6.0}
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert_close(p.detach(), q.detach(), torch.float32, "AdaWarmScheduleFree vs schedulefree")
