"""Local training and evaluation at a site, over any task."""

from __future__ import annotations

import math
import time
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


def optimizer_for(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The local optimiser a round config asks for (adam or sgd), over `params`."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r} (choose adam or sgd)")


def correction_shifts(model: torch.nn.Module, correction: Mapping[str, np.ndarray] | None):
    """SCAFFOLD's c - c_i as (parameter, shift) pairs, by parameter name (None without)."""
    if correction is None:
        return None
    named = dict(model.named_parameters())
    return [
        (named[k], torch.from_numpy(np.asarray(v, np.float32)))
        for k, v in correction.items()
        if k in named
    ]


def train_local(
    task: Task,
    model: torch.nn.Module,
    data: TensorDataset,
    config: TrainConfig,
    correction: Mapping[str, np.ndarray] | None = None,
    dp_secret: bytes | None = None,
) -> tuple[int, dict[str, float]]:
    """Train `model` in place; return (optimiser steps, training metrics).

    With `config.dpsgd_noise_multiplier > 0` this is patient-level DP-SGD
    (`twin_core.dp_sgd.train_dp_sgd`, which `dp_secret` seeds together with `config.seed`):
    its metrics are the DP-SGD event to account for, and no training loss.

    Shuffling is driven by `config.seed` alone, so the same inputs give the same weights
    (unless a time budget cuts training short, which depends on the machine). With
    `proximal_mu`, the objective adds (mu/2)||w - w_start||^2 (FedProx, Li et al., MLSys 2020).
    With `correction` (SCAFFOLD's c - c_i, by parameter name), every gradient is shifted by it.
    """
    if config.dpsgd_noise_multiplier > 0:
        from twin_core.dp_sgd import train_dp_sgd

        return train_dp_sgd(task, model, data, config, correction, secret=dp_secret)
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    shifts = correction_shifts(model, correction)
    opt = optimizer_for(params, config)
    n = len(data)
    steps, last_epoch_loss = 0, float("nan")
    # FedProx: the global weights this round started from, fixed during local training
    anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
    deadline = time.monotonic() + config.time_budget_s if config.time_budget_s > 0 else None
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        per_epoch = math.ceil(n / config.batch_size) if n else 0
        target = config.local_steps or config.local_epochs * per_epoch
        epochs = math.ceil(target / per_epoch) if per_epoch else 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            total, seen = 0.0, 0
            for start in range(0, n, config.batch_size):
                if steps >= target:
                    break
                idx = order[start : start + config.batch_size]
                loss = task.loss(model, tuple(t[idx] for t in data.tensors))
                objective = loss
                if anchor is not None:
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    objective = loss + 0.5 * config.proximal_mu * drift
                opt.zero_grad(set_to_none=True)
                objective.backward()
                for param, shift in shifts or ():
                    param.grad.add_(shift)
                opt.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
                steps += 1
                if deadline is not None and time.monotonic() > deadline:
                    break
            last_epoch_loss = total / seen if seen else float("nan")
            if deadline is not None and time.monotonic() > deadline:
                break
    model.eval()
    return steps, {"train_loss": last_epoch_loss}


def evaluate(task: Task, model: torch.nn.Module, holdout: Any) -> dict[str, float]:
    """The task's sufficient statistics of `model` on `holdout`."""
    model.eval()
    with torch.no_grad():
        return task.statistics(model, holdout)
