"""Local training and evaluation at a site, over any task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from twin_core.federation import TrainConfig
from twin_core.tasks import Task
from twin_core.weights import Weights, check_compatible


def weights_of(model: torch.nn.Module) -> Weights:
    """The model's state (parameters and buffers) as numpy arrays, in state-dict order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_weights_into(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load `weights` into `model`; InvalidWeights if names, dtypes or shapes differ."""
    check_compatible(weights, weights_of(model))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})


def train_local(
    task: Task, model: torch.nn.Module, data: TensorDataset, config: TrainConfig
) -> tuple[int, dict[str, float]]:
    """Train `model` in place; return (optimiser steps, training metrics).

    Shuffling is driven by `config.seed` alone, so the same inputs give the same weights.
    """
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r} (choose adam or sgd)")
    n = len(data)
    steps, last_epoch_loss = 0, float("nan")
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for _ in range(config.local_epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                loss = task.loss(model, tuple(t[idx] for t in data.tensors))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                steps += 1
            last_epoch_loss = total / n if n else float("nan")
    model.eval()
    return steps, {"train_loss": last_epoch_loss}


def evaluate(task: Task, model: torch.nn.Module, holdout: Any) -> dict[str, float]:
    """The task's sufficient statistics of `model` on `holdout`."""
    model.eval()
    with torch.no_grad():
        return task.statistics(model, holdout)
