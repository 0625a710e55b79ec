"""What is trained: a task names its model, loss and metrics, behind one small seam.

A task turns a site's checked table into tensors (`prepare`), builds the model from pooled
column moments (`build_model`), scores a batch (`loss`), and evaluates a model as sufficient
statistics (`statistics`) that add up across sites into pooled metrics (`metrics`). The
orchestrator only ever calls `build_model` and `metrics`; the data-facing parts run at the site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from twin_core.federation import ColumnMoments
from twin_core.schema import DataSchema


class UnitDataset(TensorDataset):
    """A TensorDataset whose rows belong to units (a site's patients): `units[i]` is the index
    (0..n_units - 1, in no meaningful order) of the unit row i belongs to.

    The tensors are exactly a TensorDataset's, so batches and `Task.loss` are unchanged; the
    index is only for training with a privacy unit larger than a row (`twin_core.dp_sgd`).
    It is a position, never an identifier, and it stays at the site like the rows do.
    """

    def __init__(self, *tensors: torch.Tensor, units: torch.Tensor | np.ndarray) -> None:
        super().__init__(*tensors)
        units = torch.as_tensor(np.asarray(units), dtype=torch.long)
        if units.shape != (len(self),):
            raise ValueError(f"unit indices of shape {tuple(units.shape)} for {len(self)} rows")
        self.units = units


@dataclass(frozen=True)
class PreparedData:
    """A site's data as tensors: a training set, a task-specific holdout, and aggregates.

    `train` is a UnitDataset when a unit (patient) can own several rows; a plain TensorDataset
    means every row is its own unit.
    """

    train: TensorDataset
    holdout: Any
    units: int
    train_examples: int
    holdout_examples: int
    moments: tuple[ColumnMoments, ...]


class Task(Protocol):
    name: str
    schema: DataSchema
    statistic_names: tuple[str, ...]
    monitoring_metric: str  # the metric (lower is better) whose worsening is performance drift

    def prepare(
        self, frame: pd.DataFrame, holdout_fraction: float, split_seed: int
    ) -> PreparedData:
        """Tensors from a table already held to the schema (see schema.check_frame)."""
        ...

    def build_model(self, moments: Mapping[str, ColumnMoments], seed: int) -> torch.nn.Module:
        """A freshly initialised model; `moments` fix its input standardisation."""
        ...

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean training loss over a batch of `prepare(...).train`."""
        ...

    def statistics(self, model: torch.nn.Module, holdout: Any) -> dict[str, float]:
        """Sums over the holdout, one per name in `statistic_names`."""
        ...

    def metrics(self, statistics: Mapping[str, float]) -> dict[str, float]:
        """Metrics from (pooled) statistics; always includes "loss"."""
        ...


def split_units(units: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over `units` (ids): True for the holdout split.

    A unit is held out when a hash of (seed, its id) falls below `holdout_fraction`, so its side
    never changes as the site's data grows: a patient trained on yesterday is not evaluated on
    today. Splits by unit (patient), never by row, so a patient's visits stay on one side. With
    two or more units at least one is held out and at least one kept.
    """
    n = len(units)
    if n == 0:
        return np.zeros(0, dtype=bool)
    draws = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{u}".encode()).digest()[:8], "little") / 2**64
            for u in units
        ]
    )
    mask = draws < holdout_fraction
    if n >= 2 and not mask.any():
        mask[np.argmin(draws)] = True
    if n >= 2 and mask.all():
        mask[np.argmax(draws)] = False
    return mask


def column_moments(column: str, values: np.ndarray) -> ColumnMoments:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return ColumnMoments(column, float(v.size), float(v.sum()), float(np.dot(v, v)))


def category_shares(features, onehot: np.ndarray) -> tuple[ColumnMoments, ...]:
    """Share of units in each declared category, as moments named "feature=category" (what a
    site reports of its case mix, e.g. its share of women; used by stratified selection)."""
    out, col = [], 0
    for f in features:
        for category in f.categories:
            out.append(column_moments(f"{f.name}={category}", onehot[:, col]))
            col += 1
    return tuple(out)


def moment_stats(
    moments: Mapping[str, ColumnMoments], columns: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation tensors for `columns` (0 and 1 where unknown)."""
    mean = [moments[c].mean if c in moments else 0.0 for c in columns]
    std = [moments[c].std if c in moments else 1.0 for c in columns]
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def task_for(schema: DataSchema, oracle: Any = None) -> Task:
    """The task a schema names; `oracle` (the patient twin on a synthetic cohort only) adds
    the generator's Bayes forecast beside the model's in the evaluation."""
    if schema.task == "patient_twin":
        from twin_core.tasks.patient_twin import PatientTwinTask

        return PatientTwinTask(schema, oracle)
    from twin_core.tasks.tabular import TabularTask

    return TabularTask(schema)
