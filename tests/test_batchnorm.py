"""adawarm.batchnorm.recompute_batchnorm_statistics: BatchNorm's statistics at the averaged
point, from the batches a DataLoader yields."""

from __future__ import annotations

import pytest
import torch

from adawarm import AdaWarmScheduleFree
from adawarm.batchnorm import recompute_batchnorm_statistics


def trained_model():
    """A model with BatchNorm trained a few schedule-free steps and moved to ``x``, in eval mode,
    and the batches it trained on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    optimizer = AdaWarmScheduleFree(
        model.parameters(), lr=0.05, warmup_steps=2, weight_decay=0.01, backend="torch"
    )
    data = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    optimizer.train()
    for inputs in data:
        loss = model(inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.eval()
    model.eval()
    return model, data


def statistics_at_x(model, inputs):
    """What the layer sees at x: the first layer's outputs, averaged over the batches."""
    with torch.no_grad():
        return torch.stack([model[0](batch).mean(0) for batch in inputs]).mean(0)


def test_the_statistics_are_recomputed_at_the_averaged_point():
    model, data = trained_model()
    norm = model[1]
    at_y = norm.running_mean.clone()
    recompute_batchnorm_statistics(model, data[:4])
    expected = statistics_at_x(model, data[:4])
    torch.testing.assert_close(norm.running_mean, expected)
    assert not torch.allclose(at_y, expected, atol=1e-3)
    assert not model.training and norm.momentum == 0.1  # as they were


def test_a_loader_of_inputs_and_targets_feeds_its_inputs():
    model, data = trained_model()
    targets = [torch.zeros(16, 1) for _ in data[:4]]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat(data[:4]), torch.cat(targets)), batch_size=16
    )
    expected = statistics_at_x(model, data[:4])
    for batches in (loader, [list(pair) for pair in zip(data[:4], targets, strict=True)]):
        recompute_batchnorm_statistics(model, batches)  # (inputs, targets) tuples, then lists
        torch.testing.assert_close(model[1].running_mean, expected)


def test_forward_runs_batches_of_any_other_form():
    model, data = trained_model()
    batches = [{"features": inputs} for inputs in data[:4]]
    recompute_batchnorm_statistics(model, batches, forward=lambda m, b: m(b["features"]))
    torch.testing.assert_close(model[1].running_mean, statistics_at_x(model, data[:4]))


def test_a_batch_the_model_cannot_take_raises_naming_the_helper_and_forward():
    model, data = trained_model()
    with pytest.raises(TypeError, match=r"recompute_batchnorm_statistics .* type dict .*forward="):
        recompute_batchnorm_statistics(model, [{"features": data[0]}])
    assert not model.training and model[1].momentum == 0.1  # put back on the way out
