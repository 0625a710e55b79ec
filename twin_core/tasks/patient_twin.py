"""The patient twin: a Gaussian next-visit forecast from a patient's baseline and history.

f(b, y_0..y_j, mask, visit, gap, arm) -> (mean, variance) of the next observed visit, an MLP over
the padded history (reference/twin-model.md). Trained by Gaussian negative log-likelihood;
rolled forward from baseline for whole trajectories; the control twin is the forecast at arm 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from twin_core.effects import EFFECT_STATISTICS, effect_metrics, effect_statistics
from twin_core.federation import ColumnMoments
from twin_core.schema import DataSchema, category_codes
from twin_core.tasks import (
    PreparedData,
    category_shares,
    column_moments,
    moment_stats,
    split_units,
)

Z90 = 1.6448536269514722  # two-sided 90 % interval of a standard normal
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class PatientTwinNet(nn.Module):
    """MLP over baseline covariates, arm, and the standardised, masked visit history."""

    def __init__(self, n_numeric: int, n_categorical: int, horizon: int, hidden: tuple[int, ...]):
        super().__init__()
        self.horizon = horizon
        self.register_buffer("numeric_mean", torch.zeros(n_numeric))
        self.register_buffer("numeric_std", torch.ones(n_numeric))
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))
        width = n_numeric + n_categorical + 1 + 2 * (horizon + 1) + horizon + 1
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, numeric, categorical, arm, history, mask, target_visit):
        """Standardised (mean, log-variance) of the visit `target_visit` (1..horizon)."""
        # a missing covariate (NaN) sits at the federation mean: 0 once standardised
        x = torch.nan_to_num((numeric - self.numeric_mean) / self.numeric_std, nan=0.0)
        h = (history - self.target_mean) / self.target_std * mask
        visits = torch.arange(self.horizon + 1, dtype=mask.dtype)
        last = (mask * visits).amax(dim=1).long()
        last_value = h.gather(1, last.unsqueeze(1)).squeeze(1)
        target_onehot = nn.functional.one_hot(target_visit - 1, self.horizon).to(x.dtype)
        gap = (target_visit - last).to(x.dtype) / self.horizon
        z = torch.cat(
            [x, categorical, arm.unsqueeze(1), h, mask, target_onehot, gap.unsqueeze(1)], 1
        )
        out = self.net(z)
        return last_value + out[:, 0], out[:, 1].clamp(-8.0, 6.0)

    def forecast(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation in the target's own units."""
        mean_s, log_var_s = self(*inputs)
        return mean_s * self.target_std + self.target_mean, torch.exp(
            0.5 * log_var_s
        ) * self.target_std


@dataclass(frozen=True)
class TwinHoldout:
    """Holdout patients: next-visit examples plus whole trajectories for roll-outs."""

    next_visit: tuple[torch.Tensor, ...]
    numeric: torch.Tensor
    categorical: torch.Tensor
    arm: torch.Tensor
    trajectory: torch.Tensor  # (patients, horizon + 1), NaN where unobserved


class PatientTwinTask:
    name = "patient_twin"
    # what monitoring watches: the whole forecast trajectory, which drifts visibly when the
    # disease course changes (a concept shift), long before next-visit likelihood does
    monitoring_metric = "trajectory_mae"

    def __init__(self, schema: DataSchema):
        self.schema = schema
        self.horizon = schema.horizon
        self.n_categorical = sum(len(f.categories) for f in schema.categorical_features)
        horizons = range(1, self.horizon + 1)
        self.statistic_names = (
            ("n", "sum_nll", "sum_abs", "sum_sq", "n_covered90")
            + tuple(f"h{h}_abs" for h in horizons)
            + tuple(f"h{h}_n" for h in horizons)
            + ("traj_abs2",)
            + EFFECT_STATISTICS
        )

    # -- data (site side) --------------------------------------------------------------
    def _patients(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        s = self.schema
        base = frame[frame[s.visit_column] == 0].set_index(s.id_column).sort_index()
        ids = base.index.to_numpy()
        y = frame.pivot(index=s.id_column, columns=s.visit_column, values=s.target)
        y = y.reindex(index=ids, columns=range(self.horizon + 1)).to_numpy(dtype=np.float64)
        numeric = base[[f.name for f in s.numeric_features]].to_numpy(dtype=np.float64)
        onehots = [
            np.eye(len(f.categories))[category_codes(base[f.name], f.categories, f.name)]
            for f in s.categorical_features
        ]
        categorical = np.concatenate(onehots, 1) if onehots else np.zeros((len(ids), 0))
        arm = base[s.arm_column].to_numpy(dtype=np.float64)
        return {"ids": ids, "y": y, "numeric": numeric, "categorical": categorical, "arm": arm}

    def _next_visit_examples(self, p: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        y = p["y"]
        observed = np.isfinite(y)
        rows, targets = np.nonzero(observed[:, 1:])
        targets = targets + 1
        before = np.arange(self.horizon + 1)[None, :] < targets[:, None]
        mask = observed[rows] & before
        history = np.where(mask, np.nan_to_num(y[rows]), 0.0)
        f32 = torch.float32
        return (
            torch.tensor(p["numeric"][rows], dtype=f32),
            torch.tensor(p["categorical"][rows], dtype=f32),
            torch.tensor(p["arm"][rows], dtype=f32),
            torch.tensor(history, dtype=f32),
            torch.tensor(mask, dtype=f32),
            torch.tensor(targets, dtype=torch.long),
            torch.tensor(y[rows, targets], dtype=f32),
        )

    def prepare(
        self, frame: pd.DataFrame, holdout_fraction: float, split_seed: int
    ) -> PreparedData:
        p = self._patients(frame)
        held = split_units(p["ids"], holdout_fraction, split_seed)
        train = {k: v[~held] for k, v in p.items()}
        hold = {k: v[held] for k, v in p.items()}
        train_set = TensorDataset(*self._next_visit_examples(train))
        hold_examples = self._next_visit_examples(hold)
        f32 = torch.float32
        holdout = TwinHoldout(
            hold_examples,
            torch.tensor(hold["numeric"], dtype=f32),
            torch.tensor(hold["categorical"], dtype=f32),
            torch.tensor(hold["arm"], dtype=f32),
            torch.tensor(hold["y"], dtype=torch.float64),
        )
        moments = tuple(
            column_moments(f.name, train["numeric"][:, i])
            for i, f in enumerate(self.schema.numeric_features)
        ) + category_shares(self.schema.categorical_features, train["categorical"])
        moments += (column_moments(self.schema.target, train["y"].ravel()),)
        return PreparedData(
            train=train_set,
            holdout=holdout,
            units=len(p["ids"]),
            train_examples=len(train_set),
            holdout_examples=len(hold_examples[-1]),
            moments=moments,
        )

    # -- model ---------------------------------------------------------------------------
    def build_model(self, moments: Mapping[str, ColumnMoments], seed: int) -> PatientTwinNet:
        numeric_names = [f.name for f in self.schema.numeric_features]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PatientTwinNet(
                len(numeric_names), self.n_categorical, self.horizon, self.schema.hidden
            )
        model.numeric_mean[:], model.numeric_std[:] = moment_stats(moments, numeric_names)
        model.target_mean[:], model.target_std[:] = moment_stats(moments, [self.schema.target])
        return model

    def loss(self, model: PatientTwinNet, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        *inputs, y = batch
        mean_s, log_var_s = model(*inputs)
        y_s = (y - model.target_mean) / model.target_std
        return 0.5 * (log_var_s + (y_s - mean_s) ** 2 * torch.exp(-log_var_s)).mean()

    # -- evaluation ----------------------------------------------------------------------
    def statistics(self, model: PatientTwinNet, holdout: TwinHoldout) -> dict[str, float]:
        stats = dict.fromkeys(self.statistic_names, 0.0)
        *inputs, y = holdout.next_visit
        if len(y):
            mean, sd = (t.double() for t in model.forecast(*inputs))
            err = y.double() - mean
            nll = _HALF_LOG_2PI + torch.log(sd) + 0.5 * (err / sd) ** 2
            stats.update(
                n=float(len(y)),
                sum_nll=float(nll.sum()),
                sum_abs=float(err.abs().sum()),
                sum_sq=float((err**2).sum()),
                n_covered90=float((err.abs() <= Z90 * sd).sum()),
            )
        stats.update(self._rollout_statistics(model, holdout))
        return stats

    def _rollout(
        self, model: PatientTwinNet, holdout: TwinHoldout, arm: torch.Tensor
    ) -> torch.Tensor:
        """Each patient's forecast trajectory from baseline alone (forecasts fed back as
        history), under `arm`: (patients, horizon + 1), the observed baseline first."""
        y = holdout.trajectory
        n = y.shape[0]
        history = torch.zeros(n, self.horizon + 1)
        mask = torch.zeros(n, self.horizon + 1)
        history[:, 0], mask[:, 0] = y[:, 0].float(), 1.0
        for h in range(1, self.horizon + 1):
            target = torch.full((n,), h, dtype=torch.long)
            mean, _ = model.forecast(
                holdout.numeric, holdout.categorical, arm, history, mask, target
            )
            history[:, h], mask[:, h] = mean, 1.0
        return history.double()

    def _rollout_statistics(self, model: PatientTwinNet, holdout: TwinHoldout) -> dict[str, float]:
        """Trajectory errors per horizon, and the treatment-effect sums at the last visit:
        PROCOVA uses the control twin's forecast (arm 0) as prognostic score, the twin's own
        effect is its forecast under treatment minus under control."""
        y = holdout.trajectory
        out: dict[str, float] = {"traj_abs2": 0.0}
        forecast = self._rollout(model, holdout, holdout.arm)
        for h in range(1, self.horizon + 1):
            observed = torch.isfinite(y[:, h])
            err = (y[:, h] - forecast[:, h])[observed]
            out[f"h{h}_abs"] = float(err.abs().sum())
            out[f"h{h}_n"] = float(observed.sum())
            out["traj_abs2"] += float((err**2).sum())
        control = self._rollout(model, holdout, torch.zeros_like(holdout.arm))[:, -1]
        treated = self._rollout(model, holdout, torch.ones_like(holdout.arm))[:, -1]
        final = torch.isfinite(y[:, -1])
        out.update(
            effect_statistics(
                holdout.arm.double()[final].numpy(),
                control[final].numpy(),
                y[final, -1].numpy(),
                (treated - control)[final].numpy(),
            )
        )
        return out

    def metrics(self, statistics: Mapping[str, float]) -> dict[str, float]:
        n = statistics.get("n", 0.0)
        if not n:
            return {"loss": float("nan")}
        out = {
            "loss": statistics["sum_nll"] / n,
            "mae": statistics["sum_abs"] / n,
            "rmse": math.sqrt(statistics["sum_sq"] / n),
            "coverage90": statistics["n_covered90"] / n,
        }
        total_abs = total_n = 0.0
        for h in range(1, self.horizon + 1):
            count = statistics.get(f"h{h}_n", 0.0)
            if count:
                out[f"mae_h{h}"] = statistics[f"h{h}_abs"] / count
                total_abs, total_n = total_abs + statistics[f"h{h}_abs"], total_n + count
        out.update(effect_metrics(statistics))
        if total_n:
            mean_abs = total_abs / total_n  # forecast from baseline, all horizons
            out["trajectory_mae"] = mean_abs
            # standard error of that mean (errors of one patient's horizons taken as independent)
            variance = max(statistics.get("traj_abs2", 0.0) / total_n - mean_abs**2, 0.0)
            out["trajectory_mae_se"] = math.sqrt(variance / total_n)
        return out
