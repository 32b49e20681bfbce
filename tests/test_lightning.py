"""Both optimizers under Lightning's Trainer, through the recipes of docs/integrations.md as
written: fit and validate, the schedule-free modes at the right hooks with BatchNorm recomputed,
a resumed run that ends where the uninterrupted one does, AdaWarm's rate in the logger."""

from __future__ import annotations

import csv
from itertools import islice
from pathlib import Path

import pytest
import torch
from doc_snippets import block_containing, torch_stand_ins

lightning = pytest.importorskip(
    "lightning", reason="the lightning extra: pip install -e '.[lightning]'"
)

from adawarm.schedule import resolve_warmup_steps  # noqa: E402

RECIPES = {
    "AdaWarm": "return AdaWarm(",
    "AdaWarmScheduleFree": "class ScheduleFreeModes",
}
LR = 3e-3  # the recipes'


def recipe(optimizer: str, folder: Path, monkeypatch) -> tuple[type, dict]:
    """Run the recipe's block (a fit of two epochs, in ``folder``) and return its module class
    and the stand-ins it ran with."""
    monkeypatch.chdir(folder)
    namespace = torch_stand_ins()
    code = block_containing("docs/integrations.md", RECIPES[optimizer])
    exec(compile(code, f"the {optimizer} recipe", "exec"), namespace)
    return namespace["Classifier"], namespace


def fresh_model():
    return torch_stand_ins()["model"]


def fit(module, namespace, folder: Path, epochs: int, **options):
    trainer = lightning.Trainer(
        max_epochs=epochs,
        default_root_dir=folder,
        logger=lightning.pytorch.loggers.CSVLogger(folder),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, namespace["train_loader"], namespace["val_loader"], **options)
    return trainer


def logged(trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as metrics:
        return list(csv.DictReader(metrics))


@pytest.mark.parametrize("optimizer", list(RECIPES))
def test_a_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_one_does(
    optimizer, tmp_path, monkeypatch
):
    classifier, namespace = recipe(optimizer, tmp_path, monkeypatch)
    straight = classifier(fresh_model())
    fit(straight, namespace, tmp_path / "straight", 2)
    first = fit(classifier(fresh_model()), namespace, tmp_path / "first", 1)
    (checkpoint,) = Path(first.checkpoint_callback.dirpath).glob("*.ckpt")
    resumed = classifier(fresh_model())
    fit(resumed, namespace, tmp_path / "resumed", 2, ckpt_path=checkpoint)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    start = fresh_model().state_dict()
    assert not torch.equal(straight.model[0].weight, start["0.weight"])  # it trained


def test_adawarm_logs_the_rate_each_step_applies(tmp_path, monkeypatch):
    classifier, namespace = recipe("AdaWarm", tmp_path, monkeypatch)
    trainer = fit(classifier(fresh_model()), namespace, tmp_path, 2)
    rates = [float(row["adawarm_lr"]) for row in logged(trainer) if row["adawarm_lr"]]
    steps = 2 * len(namespace["train_loader"])
    ramp = resolve_warmup_steps("auto", 0.999, steps)  # told the run's length: 50 steps
    assert rates == pytest.approx([LR * t / ramp for t in range(1, steps + 1)], rel=1e-6)
    assert any(row["val_loss"] for row in logged(trainer))


def test_schedule_free_trains_at_y_validates_at_x_with_batchnorm_recomputed(tmp_path, monkeypatch):
    classifier, namespace = recipe("AdaWarmScheduleFree", tmp_path, monkeypatch)
    modes = []

    class Recorded(classifier):
        def training_step(self, batch, batch_idx):
            modes.append(("train", self.trainer.optimizers[0].param_groups[0]["train_mode"]))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            modes.append(("validate", self.trainer.optimizers[0].param_groups[0]["train_mode"]))
            return super().validation_step(batch, batch_idx)

    module = Recorded(fresh_model())
    trainer = fit(module, namespace, tmp_path, 2)
    assert {step for step, _ in modes} == {"train", "validate"}  # sanity checks included
    assert all(train_mode == (step == "train") for step, train_mode in modes)
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["train_mode"] is False  # the last validation's x
    # BatchNorm's statistics are x's over the training batches, as if recomputed now
    norm = module.model[1]
    statistics = norm.running_mean.clone(), norm.running_var.clone()
    module.model.train()
    norm.reset_running_stats()
    norm.momentum = None
    with torch.no_grad():
        for inputs, _ in islice(namespace["train_loader"], 50):
            module(inputs)
    torch.testing.assert_close((norm.running_mean, norm.running_var), statistics)
    # a validation after the fit runs at x too
    trainer.validate(module, namespace["val_loader"], verbose=False)
    assert modes[-1] == ("validate", False)


def test_a_switch_in_on_save_checkpoint_would_save_x_under_a_train_mode_state(
    tmp_path, monkeypatch
):
    # Why the recipe does not switch there (docs/integrations.md): the states are collected.
    classifier, namespace = recipe("AdaWarmScheduleFree", tmp_path, monkeypatch)
    saved = []

    class SwitchingOnSave(classifier):
        def on_save_checkpoint(self, checkpoint):
            for optimizer in self.trainer.optimizers:
                optimizer.eval()
            weight = checkpoint["state_dict"]["model.0.weight"]
            mode = checkpoint["optimizer_states"][0]["param_groups"][0]["train_mode"]
            saved.append((torch.equal(weight, self.model[0].weight), mode))

    every_two_steps = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1
    )
    trainer = lightning.Trainer(
        max_epochs=1, callbacks=[every_two_steps], logger=False, enable_progress_bar=False
    )
    trainer.fit(SwitchingOnSave(fresh_model()), namespace["train_loader"], namespace["val_loader"])
    assert (True, True) in saved  # the weights as moved to x, the state saying train mode
