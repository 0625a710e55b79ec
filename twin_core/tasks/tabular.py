"""Plain tabular supervised learning: feature columns to one target, no time and no arm.

Regression (squared error, reported as MSE, MAE, RMSE and R²) or classification (cross-entropy,
reported as log loss and accuracy), with an MLP whose input standardisation comes from pooled
column moments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from twin_core.federation import ColumnMoments
from twin_core.schema import DataSchema, category_codes
from twin_core.tasks import (
    PreparedData,
    category_shares,
    column_moments,
    moment_stats,
    split_units,
)


class TabularNet(nn.Module):
    def __init__(self, n_numeric: int, n_categorical: int, n_outputs: int, hidden: tuple[int, ...]):
        super().__init__()
        self.register_buffer("numeric_mean", torch.zeros(n_numeric))
        self.register_buffer("numeric_std", torch.ones(n_numeric))
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))
        width = n_numeric + n_categorical
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        # a missing covariate (NaN) sits at the federation mean: 0 once standardised
        x = torch.nan_to_num((numeric - self.numeric_mean) / self.numeric_std, nan=0.0)
        return self.net(torch.cat([x, categorical], 1))


class TabularTask:
    name = "tabular"
    monitoring_metric = "loss"

    def __init__(self, schema: DataSchema):
        self.schema = schema
        self.classification = schema.problem == "classification"
        self.n_categorical = sum(len(f.categories) for f in schema.categorical_features)
        self.statistic_names = (
            ("n", "sum_nll", "n_correct")
            if self.classification
            else ("n", "sum_sq", "sum_abs", "sum_y", "sum_y2")
        )

    def _tensors(self, frame: pd.DataFrame) -> tuple[torch.Tensor, ...]:
        s = self.schema
        numeric = frame[[f.name for f in s.numeric_features]].to_numpy(dtype=np.float64)
        onehots = [
            np.eye(len(f.categories))[category_codes(frame[f.name], f.categories, f.name)]
            for f in s.categorical_features
        ]
        categorical = np.concatenate(onehots, 1) if onehots else np.zeros((len(frame), 0))
        if self.classification:
            target = torch.tensor(category_codes(frame[s.target], s.classes, s.target))
        else:
            target = torch.tensor(frame[s.target].to_numpy(dtype=np.float64), dtype=torch.float32)
        f32 = torch.float32
        return torch.tensor(numeric, dtype=f32), torch.tensor(categorical, dtype=f32), target

    def prepare(
        self, frame: pd.DataFrame, holdout_fraction: float, split_seed: int
    ) -> PreparedData:
        ids = self.schema.id_column
        # by id when the schema names one, else by row position (stable while rows are appended)
        units = frame[ids].astype(str).to_numpy() if ids else np.arange(len(frame))
        held = split_units(units, holdout_fraction, split_seed)
        train = frame[~held].reset_index(drop=True)
        holdout = TensorDataset(*self._tensors(frame[held].reset_index(drop=True)))
        moments = tuple(
            column_moments(f.name, train[f.name].to_numpy()) for f in self.schema.numeric_features
        )
        train_tensors = self._tensors(train)
        moments += category_shares(self.schema.categorical_features, train_tensors[1].numpy())
        if not self.classification:
            moments += (column_moments(self.schema.target, train[self.schema.target].to_numpy()),)
        return PreparedData(
            train=TensorDataset(*train_tensors),
            holdout=holdout,
            units=len(frame),
            train_examples=len(train),
            holdout_examples=len(holdout),
            moments=moments,
        )

    def build_model(self, moments: Mapping[str, ColumnMoments], seed: int) -> TabularNet:
        names = [f.name for f in self.schema.numeric_features]
        outputs = len(self.schema.classes) if self.classification else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TabularNet(len(names), self.n_categorical, outputs, self.schema.hidden)
        model.numeric_mean[:], model.numeric_std[:] = moment_stats(moments, names)
        if not self.classification:
            model.target_mean[:], model.target_std[:] = moment_stats(moments, [self.schema.target])
        return model

    def loss(self, model: TabularNet, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        numeric, categorical, target = batch
        out = model(numeric, categorical)
        if self.classification:
            return nn.functional.cross_entropy(out, target)
        target_s = (target - model.target_mean) / model.target_std
        return ((out[:, 0] - target_s) ** 2).mean()

    def statistics(self, model: TabularNet, holdout: TensorDataset) -> dict[str, float]:
        numeric, categorical, target = holdout.tensors
        stats = dict.fromkeys(self.statistic_names, 0.0)
        if not len(target):
            return stats
        out = model(numeric, categorical).double()
        stats["n"] = float(len(target))
        if self.classification:
            nll = nn.functional.cross_entropy(out, target, reduction="sum")
            stats["sum_nll"] = float(nll)
            stats["n_correct"] = float((out.argmax(1) == target).sum())
        else:
            pred = out[:, 0] * model.target_std.double() + model.target_mean.double()
            y = target.double()
            err = y - pred
            stats.update(
                sum_sq=float((err**2).sum()),
                sum_abs=float(err.abs().sum()),
                sum_y=float(y.sum()),
                sum_y2=float((y**2).sum()),
            )
        return stats

    def metrics(self, statistics: Mapping[str, float]) -> dict[str, float]:
        n = statistics.get("n", 0.0)
        if not n:
            return {"loss": float("nan")}
        if self.classification:
            return {"loss": statistics["sum_nll"] / n, "accuracy": statistics["n_correct"] / n}
        mse = statistics["sum_sq"] / n
        total = statistics["sum_y2"] - statistics["sum_y"] ** 2 / n
        out = {"loss": mse, "mae": statistics["sum_abs"] / n, "rmse": math.sqrt(mse)}
        if total > 0:
            out["r2"] = 1.0 - statistics["sum_sq"] / total
        return out
