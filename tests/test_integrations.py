"""Both optimizers inside a compiled model, and with the Hugging Face Trainer (LR schedulers:
the promise matrix, tests/test_promises.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cpu_training_arguments, tiny_language_model

from adawarm import AdaWarm, AdaWarmScheduleFree


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
    model, dataset = tiny_language_model(transformers, 32)
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
    arguments = cpu_training_arguments(
        transformers, tmp_path, max_steps=5, per_device_train_batch_size=8, logging_steps=1
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

    def train(make_optimizer):
        model, dataset = tiny_language_model(
            transformers, 32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        optimizer = make_optimizer(model.parameters())
        arguments = cpu_training_arguments(
            transformers,
            tmp_path,
            max_steps=6,
            per_device_train_batch_size=8,
            eval_strategy="steps",
            eval_steps=2,
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
