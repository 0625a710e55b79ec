"""Local training by hand: plain SGD, the FedProx proximal term and SCAFFOLD's correction on a
one-weight model, where every step can be computed with pencil and paper."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from twin_core.federation import TrainConfig
from twin_core.training import train_local


class Squares:
    """loss(w) = mean((w x - y)^2); with x = 1, y = 2 the gradient is 2 (w - 2)."""

    def loss(self, model, batch):
        x, y = batch
        return ((model(x).squeeze(1) - y) ** 2).mean()


def _train(**config) -> float:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = TensorDataset(torch.tensor([[1.0]]), torch.tensor([2.0]))
    correction = config.pop("correction", None)
    settings = TrainConfig(
        local_epochs=2, batch_size=1, learning_rate=0.1, optimizer="sgd", **config
    )
    steps, _ = train_local(Squares(), model, data, settings, correction)
    assert steps == 2
    return float(model.weight.detach())


def test_plain_sgd_by_hand():
    # w1 = 0 - 0.1 * 2(0 - 2) = 0.4; w2 = 0.4 - 0.1 * 2(0.4 - 2) = 0.72
    assert _train() == pytest.approx(0.72)


def test_fedprox_pulls_towards_the_start_by_hand():
    # the proximal gradient mu (w - w0) is 0 at the start; then 1.0 * 0.4:
    # w2 = 0.4 - 0.1 * (2(0.4 - 2) + 0.4) = 0.68
    assert _train(proximal_mu=1.0) == pytest.approx(0.68)


def test_scaffold_correction_shifts_every_gradient_by_hand():
    # correction c - c_i = 0.5: w1 = 0 - 0.1 * (-4 + 0.5) = 0.35;
    # w2 = 0.35 - 0.1 * (2(0.35 - 2) + 0.5) = 0.63
    assert _train(correction={"weight": [[0.5]]}) == pytest.approx(0.63)


def test_local_steps_replace_epochs_and_cross_epoch_boundaries():
    """Five rows, batch 2: an epoch is 3 steps. local_steps=4 takes one epoch and one step of
    the next; local_steps=2 stops inside the first; 0 keeps local_epochs."""
    data = TensorDataset(torch.ones(5, 1), torch.full((5,), 2.0))

    def run(**config):
        model = torch.nn.Linear(1, 1, bias=False)
        settings = TrainConfig(batch_size=2, learning_rate=0.01, optimizer="sgd", **config)
        return train_local(Squares(), model, data, settings)[0]

    assert run(local_epochs=2, local_steps=4) == 4
    assert run(local_epochs=2, local_steps=2) == 2
    assert run(local_epochs=2) == 6
    assert run(local_epochs=0, local_steps=7) == 7
