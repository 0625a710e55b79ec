"""The patient twin: a Gaussian next-visit forecast from a patient's baseline and history.

f(b, y_0..y_j, mask, visit, gap, arm, site noise) -> (mean, variance) of a later visit
(reference/twin-model.md): a random-intercept, random-slope course whose prior is learnt and
which Bayes' rule updates with the visits seen so far, corrected by an MLP over the padded
history. Trained by Gaussian negative log-likelihood; rolled forward for whole trajectories
(sampled paths give intervals beyond one visit); the control twin is the forecast at arm 0.

Evaluated, at the site, by horizon from every observed visit, beside the last observed value
and, on the synthetic cohort, beside the oracle (twin_core/oracle.py); treatment effects come
back as sums (twin_core/effects.py). The paths evaluation reads are rolled forward together, a
visit at a time, and each only as far as a statistic reads it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from twin_core.effects import EFFECT_STATISTICS, effect_metrics, effect_statistics
from twin_core.federation import ColumnMoments
from twin_core.oracle import Oracle
from twin_core.schema import DataSchema, category_codes
from twin_core.tasks import (
    PreparedData,
    UnitDataset,
    category_shares,
    column_moments,
    moment_stats,
    split_units,
)

Z90 = 1.6448536269514722  # two-sided 90 % interval of a standard normal
# beyond one visit ahead, intervals come from SAMPLES sampled paths: mean +- t * sd * sqrt(1 +
# 1/SAMPLES) is an exact 90 % prediction interval for a new draw of a normal known by SAMPLES
# draws (t: the 95 % quantile of Student's t with SAMPLES - 1 degrees of freedom)
SAMPLES = 32
_T_SAMPLES = 1.6955187825458649 * math.sqrt(1 + 1 / SAMPLES)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# rows per forward pass in evaluation: as fast per row as larger passes, and their hidden layers
# reuse freed memory, where a whole step's (several MB each) came as fresh pages, a page fault
# every 4 kB (measured, a 100 k parameter twin over 5 500 rows: 17 ms in one pass, 12 in three)
_FORWARD_ROWS = 2048


N_SUMMARY = 6  # features of the observed history, see history_summary


def history_summary(h: torch.Tensor, mask: torch.Tensor, target_visit: torch.Tensor):
    """What a linear fit to the observed history says, per row: share of visits seen, their
    mean, the least-squares slope and residual spread, and the line's value at the target.

    The Bayes forecast of a noisy linear course is a function of exactly these, weighed by
    how many visits there are; an MLP finds products of mask and value hard to learn from the
    padded history alone, so they are given to it. Visit times are scaled to [0, 1].
    """
    n_visits = mask.shape[1]
    t = torch.arange(n_visits, dtype=h.dtype) / (n_visits - 1)
    k = mask.sum(1)
    t_bar = (mask * t).sum(1) / k
    y_bar = (mask * h).sum(1) / k
    dt = (t[None, :] - t_bar[:, None]) * mask
    sxx = (dt * dt).sum(1)
    has_slope = (k >= 2).to(h.dtype)
    slope = has_slope * (dt * (h - y_bar[:, None])).sum(1) / sxx.clamp_min(1e-6)
    residual = (h - y_bar[:, None] - slope[:, None] * dt) * mask
    has_spread = (k >= 3).to(h.dtype)
    spread = has_spread * torch.sqrt((residual**2).sum(1) / (k - 2).clamp_min(1.0) + 1e-8)
    at_target = y_bar + slope * (target_visit.to(h.dtype) / (n_visits - 1) - t_bar)
    return torch.stack([k / n_visits, y_bar, slope, spread, has_spread, at_target], 1)


class LinearCourse(nn.Module):
    """A random-intercept, random-slope course updated by the observed visits (Bayes' rule
    in closed form): the structure of a disease-progression mixed model, learnt.

    Each patient's course is a line, level + slope * t; its prior mean is linear in the
    baseline covariates and arm, its prior covariance is learnt, and the site's measurement
    noise (estimated at the site) sets how far the observed visits pull it. The forecast of
    the target visit is the posterior predictive (mean, variance); the MLP corrects both.
    """

    def __init__(self, n_inputs: int, horizon: int):
        super().__init__()
        self.horizon = horizon
        self.prior_mean = nn.Linear(n_inputs, 2)
        self.log_sd = nn.Parameter(torch.tensor([0.0, -1.0]))  # level, slope per horizon
        self.correlation = nn.Parameter(torch.zeros(1))  # tanh -> (-1, 1)

    def forward(self, covariates, h, mask, target_visit, noise):
        t = torch.arange(self.horizon + 1, dtype=h.dtype) / self.horizon
        mu = self.prior_mean(covariates)
        sd = torch.exp(self.log_sd)
        r = torch.tanh(self.correlation)[0] * 0.99
        s00, s11, s01 = sd[0] ** 2, sd[1] ** 2, r * sd[0] * sd[1]
        det = s00 * s11 - s01**2
        p00, p11, p01 = s11 / det, s00 / det, -s01 / det  # prior precision
        noise2 = noise.clamp_min(1e-3) ** 2
        k, st, stt = mask.sum(1), (mask * t).sum(1), (mask * t * t).sum(1)
        sy, sty = (mask * h).sum(1), (mask * t * h).sum(1)
        a00, a01, a11 = p00 + k / noise2, p01 + st / noise2, p11 + stt / noise2
        b0 = p00 * mu[:, 0] + p01 * mu[:, 1] + sy / noise2
        b1 = p01 * mu[:, 0] + p11 * mu[:, 1] + sty / noise2
        det_a = a00 * a11 - a01**2
        c00, c11, c01 = a11 / det_a, a00 / det_a, -a01 / det_a  # posterior covariance
        m0, m1 = c00 * b0 + c01 * b1, c01 * b0 + c11 * b1
        tt = target_visit.to(h.dtype) / self.horizon
        mean = m0 + m1 * tt
        var = c00 + 2 * c01 * tt + c11 * tt * tt + noise2
        return mean, var


class PatientTwinNet(nn.Module):
    """A learnt line prior updated by the observed visits (LinearCourse), corrected by an MLP
    over the baseline covariates, arm, the standardised masked visit history, a summary of that
    history and the site's measurement noise (estimated at the site from its own data)."""

    def __init__(self, n_numeric: int, n_categorical: int, horizon: int, hidden: tuple[int, ...]):
        super().__init__()
        self.horizon = horizon
        self.register_buffer("numeric_mean", torch.zeros(n_numeric))
        self.register_buffer("numeric_std", torch.ones(n_numeric))
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))
        width = (
            n_numeric + n_categorical + 1 + 2 * (horizon + 1) + horizon + 1 + N_SUMMARY + N_CONTEXT
        )
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)
        self.course = LinearCourse(n_numeric + n_categorical + 1 + N_CONTEXT, horizon)

    def forward(self, numeric, categorical, arm, history, mask, target_visit, context):
        """Standardised (mean, log-variance) of the visit `target_visit` (1..horizon)."""
        # a missing covariate (NaN) sits at the federation mean: 0 once standardised
        x = torch.nan_to_num((numeric - self.numeric_mean) / self.numeric_std, nan=0.0)
        h = (history - self.target_mean) / self.target_std * mask
        visits = torch.arange(self.horizon + 1, dtype=mask.dtype)
        last = (mask * visits).amax(dim=1).long()
        # one-hot by comparison (not F.one_hot, which torch.func.vmap cannot batch; DP-SGD's
        # per-patient gradients use vmap)
        target_onehot = (target_visit.unsqueeze(1) == torch.arange(1, self.horizon + 1)).to(x.dtype)
        gap = (target_visit - last).to(x.dtype) / self.horizon
        summary = history_summary(h, mask, target_visit)
        site = self.standardise_context(context)
        z = torch.cat(
            [
                x,
                categorical,
                arm.unsqueeze(1),
                h,
                mask,
                target_onehot,
                gap.unsqueeze(1),
                summary,
                site,
            ],
            1,
        )
        out = self._mlp(z)
        scale = site[:, 0]
        baseline = torch.cat([x, categorical, arm.unsqueeze(1), site], 1)
        course_mean, course_var = self.course(baseline, h, mask, target_visit, scale)
        # the MLP corrects in units of the site's noise: a correction learnt at noisy sites
        # must not swamp the forecast at a precise one
        # the log-variance bounded as a whole: a wild MLP output must not make it infinite
        log_var = (torch.log(course_var) + out[:, 1]).clamp(-12.0, 8.0)
        return course_mean + scale * out[:, 0], log_var

    def _mlp(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP; without autograd (evaluation), each ReLU in place, sparing a copy of every
        hidden layer (in training, autograd and DP-SGD's vmap see the plain modules)."""
        if torch.is_grad_enabled():
            return self.net(z)
        for layer in self.net:
            z = z.relu_() if isinstance(layer, nn.ReLU) else layer(z)
        return z

    def standardise_context(self, context: torch.Tensor) -> torch.Tensor:
        """The site's noise, baseline level and slope per visit, in standardised units."""
        std = self.target_std
        return torch.stack(
            [
                context[:, 0] / std,
                (context[:, 1] - self.target_mean) / std,
                context[:, 2] * self.horizon / std,
            ],
            1,
        )

    def forecast(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation in the target's own units."""
        mean_s, log_var_s = self(*inputs)
        return mean_s * self.target_std + self.target_mean, torch.exp(
            0.5 * log_var_s
        ) * self.target_std


def site_noise_sd(y: np.ndarray) -> float:
    """A site's measurement noise: the pooled spread of its patients' visits around their own
    least-squares lines (patients with three or more observed visits); NaN if it has none."""
    observed = np.isfinite(y)
    k = observed.sum(1)
    rows = k >= 3
    if not rows.any():
        return math.nan
    t = np.broadcast_to(np.arange(y.shape[1], dtype=np.float64), y.shape)[rows]
    m, v = observed[rows], np.nan_to_num(y[rows])
    kk = k[rows].astype(np.float64)
    t_bar = (m * t).sum(1) / kk
    y_bar = (m * v).sum(1) / kk
    dt = (t - t_bar[:, None]) * m
    slope = (dt * (v - y_bar[:, None])).sum(1) / (dt * dt).sum(1)
    rss = (((v - y_bar[:, None] - slope[:, None] * dt) * m) ** 2).sum()
    return float(math.sqrt(rss / (kk - 2).sum()))


N_CONTEXT = 3  # what a site knows of itself: noise, mean baseline level, mean slope


def site_context(y: np.ndarray) -> tuple[float, float, float]:
    """A site's context, from its own training patients (it never leaves the site): its
    measurement noise (site_noise_sd; with too few repeated visits, the spread of y), its mean
    baseline value and its patients' mean least-squares slope per visit. A site's case mix and
    calibration shift every patient's course; these let the twin's prior move with them, as a
    site effect in a mixed model would."""
    finite = y[np.isfinite(y)]
    noise = site_noise_sd(y)
    if not (math.isfinite(noise) and noise > 0):
        noise = float(finite.std()) if finite.size > 1 and finite.std() > 0 else 1.0
    base = y[:, 0][np.isfinite(y[:, 0])] if y.size else np.zeros(0)
    level = float(base.mean()) if base.size else (float(finite.mean()) if finite.size else 0.0)
    return noise, level, _mean_slope(y)


def _mean_slope(y: np.ndarray) -> float:
    observed = np.isfinite(y)
    k = observed.sum(1)
    rows = k >= 2
    if not rows.any():
        return 0.0
    t = np.broadcast_to(np.arange(y.shape[1], dtype=np.float64), y.shape)[rows]
    m, v = observed[rows], np.nan_to_num(y[rows])
    kk = k[rows].astype(np.float64)
    dt = (t - ((m * t).sum(1) / kk)[:, None]) * m
    y_bar = (m * v).sum(1) / kk
    return float(((dt * (v - y_bar[:, None])).sum(1) / (dt * dt).sum(1)).mean())


@dataclass(frozen=True)
class TwinHoldout:
    """Holdout patients: next-visit examples plus whole trajectories for forecasts."""

    next_visit: tuple[torch.Tensor, ...]
    numeric: torch.Tensor
    categorical: torch.Tensor
    arm: torch.Tensor
    context: torch.Tensor  # (patients, N_CONTEXT): the site's context (site_context)
    trajectory: torch.Tensor  # (patients, horizon + 1), NaN where unobserved
    covariates: dict[str, np.ndarray]  # raw baseline covariates by name (for the oracle)
    draws: torch.Tensor  # (patients, SAMPLES, horizon + 1) standard normals, fixed per patient

    @classmethod
    def concat(cls, a: TwinHoldout, b: TwinHoldout) -> TwinHoldout:
        """Two holdouts as one (e.g. two sites' patients pooled, to check that sums add up)."""
        return cls(
            tuple(torch.cat([x, y]) for x, y in zip(a.next_visit, b.next_visit, strict=True)),
            *(
                torch.cat([getattr(a, name), getattr(b, name)])
                for name in ("numeric", "categorical", "arm", "context", "trajectory")
            ),
            {k: np.concatenate([a.covariates[k], b.covariates[k]]) for k in a.covariates},
            torch.cat([a.draws, b.draws]),
        )


def patient_draws(ids: np.ndarray, width: int) -> torch.Tensor:
    """Standard normal draws for each patient's sampled paths, seeded by the patient's id: a
    patient's interval is the same whichever patients are evaluated with it, so statistics
    add up across sites and batches exactly."""
    out = np.empty((len(ids), SAMPLES, width), dtype=np.float32)
    for i, unit in enumerate(ids):
        seed = int.from_bytes(hashlib.sha256(f"paths:{unit}".encode()).digest()[:8], "little")
        out[i] = np.random.default_rng(seed).standard_normal((SAMPLES, width))
    return torch.from_numpy(out)


@dataclass(frozen=True)
class PathRequest:
    """Paths to roll forward (PatientTwinTask._paths): for each of `patients` (holdout rows),
    from the visits observed up to `origin` under `arm` (one per patient), the mean path and
    `samples` sampled paths, each forecast only up to the patient's visit `until` (the last
    one a statistic reads)."""

    patients: torch.Tensor  # (n,) long
    origin: int
    arm: torch.Tensor  # (n,)
    until: torch.Tensor  # (n,) long
    samples: int = 0


@dataclass(frozen=True)
class _PathRows:
    """The rows of requests' paths, concatenated: each request's mean paths, then its sampled
    paths copy by copy; per row, its patient, origin, arm and last visit needed, which of the
    patient's draws it takes (-1: the mean path) and the row of its mean path."""

    requests: tuple[PathRequest, ...]
    patient: torch.Tensor
    origin: torch.Tensor
    arm: torch.Tensor
    until: torch.Tensor
    draw: torch.Tensor
    mean_row: torch.Tensor

    @classmethod
    def of(cls, requests: list[PathRequest]) -> _PathRows:
        blocks, offset = [], 0
        for r in requests:
            n = len(r.patients)
            at = torch.arange(n).repeat(1 + r.samples)  # the patient's position in the request
            blocks.append(
                (
                    r.patients[at],
                    torch.full((len(at),), r.origin),
                    r.arm[at],
                    r.until[at],
                    torch.arange(-1, r.samples).repeat_interleave(n),
                    offset + at,
                )
            )
            offset += len(at)
        columns = (torch.cat(c) for c in zip(*blocks, strict=True))
        return cls(tuple(requests), *columns)

    def split(self, paths: torch.Tensor, first_sd: torch.Tensor) -> list[tuple]:
        """Per request: mean paths (n, width), sampled paths (samples, n, width) or None, and
        the standard deviation of each mean path's first forecast (n,)."""
        out, offset = [], 0
        for r in self.requests:
            n = len(r.patients)
            block = paths[offset : offset + (1 + r.samples) * n]
            sampled = block[n:].view(r.samples, n, block.shape[1]) if r.samples else None
            out.append((block[:n], sampled, first_sd[offset : offset + n].double()))
            offset += len(block)
        return out


class PatientTwinTask:
    name = "patient_twin"
    # what monitoring watches: the whole forecast trajectory from baseline, which drifts
    # visibly when the disease course changes (a concept shift), long before next-visit
    # likelihood does; its errors in units of the twin's own predicted spread, so that a site
    # whose extract gains later visits (larger errors at longer horizons) is not "drift"
    monitoring_metric = "trajectory_z"

    def __init__(self, schema: DataSchema, oracle: Oracle | None = None):
        self.schema = schema
        self.horizon = schema.horizon
        self.oracle = oracle  # the generator's truth at this site (evaluation only)
        self.n_categorical = sum(len(f.categories) for f in schema.categorical_features)
        per_horizon = (
            "n",
            "abs",
            "sq",
            "cov",
            "naive_abs",
            "oracle_abs",
            "oracle_sq",
            "oracle_cov",
        )
        self.statistic_names = (
            ("n", "sum_nll", "sum_abs", "sum_sq", "n_covered90")
            + tuple(f"h{h}_{k}" for h in range(1, self.horizon + 1) for k in per_horizon)
            + tuple(
                f"b{h}_{k}"  # from baseline alone (origin 0)
                for h in range(1, self.horizon + 1)
                for k in ("n", "abs", "sq", "oracle_abs")
            )
            + ("oracle_points", "oracle_floor", "traj_abs2", "traj_z", "traj_z2")
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
        out = {"ids": ids, "y": y, "numeric": numeric, "categorical": categorical, "arm": arm}
        for f in s.features:  # raw values, for the oracle (numbers only; others stay out)
            values = pd.to_numeric(base[f.name], errors="coerce")
            out[f"raw:{f.name}"] = values.to_numpy(dtype=np.float64)
        return out

    def _next_visit_examples(
        self, p: dict[str, np.ndarray], context: tuple[float, ...]
    ) -> tuple[torch.Tensor, ...]:
        y = p["y"]
        observed = np.isfinite(y)
        rows, targets = _example_rows(y)
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
            torch.tensor([context], dtype=f32).repeat(len(rows), 1),
            torch.tensor(y[rows, targets], dtype=f32),
        )

    def prepare(
        self, frame: pd.DataFrame, holdout_fraction: float, split_seed: int
    ) -> PreparedData:
        p = self._patients(frame)
        held = split_units(p["ids"], holdout_fraction, split_seed)
        train = {k: v[~held] for k, v in p.items()}
        hold = {k: v[held] for k, v in p.items()}
        context = site_context(train["y"])
        # the patient (0..n-1 among those with a training row) of each row: the privacy unit
        # of patient-level DP-SGD (twin_core/dp_sgd.py)
        patient = np.unique(_example_rows(train["y"])[0], return_inverse=True)[1]
        train_set = UnitDataset(*self._next_visit_examples(train, context), units=patient)
        holdout = self._holdout(hold, context)
        hold_examples = holdout.next_visit
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

    def _holdout(self, p: dict[str, np.ndarray], context: tuple[float, ...]) -> TwinHoldout:
        f32 = torch.float32
        return TwinHoldout(
            self._next_visit_examples(p, context),
            torch.tensor(p["numeric"], dtype=f32),
            torch.tensor(p["categorical"], dtype=f32),
            torch.tensor(p["arm"], dtype=f32),
            torch.tensor([context], dtype=f32).repeat(len(p["ids"]), 1),
            torch.tensor(p["y"], dtype=torch.float64),
            {k[4:]: v for k, v in p.items() if k.startswith("raw:")},
            patient_draws(p["ids"], self.horizon + 1),
        )

    def baseline_forecasts(self, model: PatientTwinNet, frame: pd.DataFrame) -> dict:
        """Every patient of `frame` forecast from baseline alone (for pictures, e.g. of
        synthetic patients): ids, observed values, the mean path and its 90 % band."""
        p = self._patients(frame)
        holdout = self._holdout(p, site_context(p["y"]))
        n = len(p["ids"])
        everything = PathRequest(
            torch.arange(n), 0, holdout.arm, torch.full((n,), self.horizon), SAMPLES
        )
        model.eval()
        with torch.no_grad():
            [(mean, sampled, _)] = self._paths(model, holdout, [everything])
        centre, spread = sampled.mean(0), sampled.std(0)
        low, high = centre - _T_SAMPLES * spread, centre + _T_SAMPLES * spread
        low[:, 0] = high[:, 0] = mean[:, 0]
        return {
            "ids": p["ids"],
            "arm": p["arm"],
            "observed": p["y"],
            "mean": mean.numpy(),
            "low": low.numpy(),
            "high": high.numpy(),
        }

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
        """The sums of `statistic_names` on `holdout`: next-visit likelihood and errors, errors
        and intervals by horizon, treatment-effect sums (no autograd: numbers only)."""
        with torch.inference_mode():
            return self._statistics(model, holdout)

    def _statistics(self, model: PatientTwinNet, holdout: TwinHoldout) -> dict[str, float]:
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
        if len(holdout.arm):
            # the paths both read, rolled forward together
            horizon, effect = self._horizon_requests(holdout), self._effect_requests(holdout)
            paths = self._paths(model, holdout, horizon + effect)
            stats.update(self._horizon_statistics(holdout, horizon, paths[: len(horizon)]))
            stats.update(self._effect_statistics(holdout, paths[len(horizon) :]))
        return stats

    def _paths(
        self, model: PatientTwinNet, holdout: TwinHoldout, requests: list[PathRequest]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """The paths `requests` ask for, rolled forward together a visit at a time (one forward
        pass per visit whatever the origins, in chunks of _FORWARD_ROWS rows): per request, the
        mean paths (each forecast fed back as history), the sampled paths (a draw from each
        forecast fed back) or None, and the standard deviation of each first forecast (one
        visit ahead: the Gaussian itself). Visits past a patient's `until` are NaN: nothing
        reads them, none is forecast."""
        rows = _PathRows.of(requests)
        visits = torch.arange(self.horizon + 1)
        y = holdout.trajectory[rows.patient]
        observed = torch.isfinite(y) & (visits[None, :] <= rows.origin[:, None])
        history, mask = torch.where(observed, y, 0.0).float(), observed.float()
        draws = holdout.draws[rows.patient, rows.draw.clamp_min(0)]
        is_sample, first_sd = rows.draw >= 0, torch.zeros(len(y))
        for visit in visits[1:].tolist():
            active = (rows.origin < visit) & (rows.until >= visit)
            first = rows.origin == visit - 1
            mean, sd = self._step(
                model, holdout, rows, active & ~(is_sample & first), history, mask, visit
            )
            # every copy has the same history up to the origin: a sampled path's first step is
            # a draw from its mean path's forecast
            source = torch.where(first, rows.mean_row, torch.arange(len(y)))
            mean, sd = mean[source], sd[source]
            value = torch.where(is_sample, mean + sd * draws[:, visit], mean)
            history[active, visit] = value[active]
            mask[active, visit] = 1.0
            first_sd = torch.where(first, sd, first_sd)
        unread = visits[None, :] > torch.maximum(rows.origin, rows.until)[:, None]
        return rows.split(history.double().masked_fill(unread, math.nan), first_sd)

    def _step(
        self,
        model: PatientTwinNet,
        holdout: TwinHoldout,
        rows: _PathRows,
        run: torch.Tensor,
        history: torch.Tensor,
        mask: torch.Tensor,
        visit: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forecast (mean, sd) of `visit` for rows `run` (a mask), zero for the others."""
        mean, sd = torch.zeros(len(run)), torch.zeros(len(run))
        for i in torch.nonzero(run).squeeze(1).split(_FORWARD_ROWS):
            p = rows.patient[i]
            mean[i], sd[i] = model.forecast(
                holdout.numeric[p],
                holdout.categorical[p],
                rows.arm[i],
                history[i],
                mask[i],
                torch.full((len(i),), visit),
                holdout.context[p],
            )
        return mean, sd

    def _horizon_statistics(
        self, holdout: TwinHoldout, requests: list[PathRequest], paths: list[tuple]
    ) -> dict:
        """Errors by horizon: from every observed visit (the forecast origin), the visits h
        ahead that were observed; the twin's 90 % interval there (h = 1: its Gaussian; later:
        the spread of sampled paths, as a prediction interval from SAMPLES draws); the last
        observed value as a naive forecast; and the oracle's forecast from the same history.
        The twin's paths are those of `_horizon_requests`."""
        y = holdout.trajectory
        width = self.horizon + 1
        out: dict[str, float] = {}
        oracle_points = 0.0
        for request, (mean_path, sampled, first_sd) in zip(requests, paths, strict=True):
            rows, origin = request.patients, request.origin
            if not len(rows):
                continue
            observed = torch.isfinite(y[rows]) & (torch.arange(width)[None, :] <= origin)
            for visit in range(origin + 1, width):
                h, target = visit - origin, y[rows, visit]
                seen = torch.isfinite(target)
                if not seen.any():
                    continue
                err = (target - mean_path[:, visit])[seen]
                if h == 1:
                    spread = first_sd[seen]
                    covered = err.abs() <= Z90 * spread
                else:
                    draws = sampled[:, :, visit][:, seen]
                    centre, spread = draws.mean(0), draws.std(0)
                    covered = (target[seen] - centre).abs() <= _T_SAMPLES * spread
                naive = y[rows, origin][seen]
                _add(out, f"h{h}_n", float(seen.sum()))
                _add(out, f"h{h}_abs", float(err.abs().sum()))
                _add(out, f"h{h}_sq", float((err**2).sum()))
                _add(out, f"h{h}_cov", float(covered.sum()))
                _add(out, f"h{h}_naive_abs", float((target[seen] - naive).abs().sum()))
                if self.oracle is not None:
                    o = self._oracle(holdout, rows[seen], observed[seen], visit)
                    o_err = target[seen].numpy() - o.mean
                    _add(out, f"h{h}_oracle_abs", float(np.abs(o_err).sum()))
                    _add(out, f"h{h}_oracle_sq", float((o_err**2).sum()))
                    _add(out, f"h{h}_oracle_cov", float((np.abs(o_err) <= Z90 * o.sd).sum()))
                    oracle_points += float(seen.sum())
                    if h == 1:
                        _add(out, "oracle_floor", self.oracle.noise_floor * float(seen.sum()))
                    if origin == 0:
                        _add(out, f"b{h}_oracle_abs", float(np.abs(o_err).sum()))
                if origin == 0:  # the trajectory from baseline alone (monitoring watches it)
                    _add(out, f"b{h}_n", float(seen.sum()))
                    _add(out, f"b{h}_abs", float(err.abs().sum()))
                    _add(out, f"b{h}_sq", float((err**2).sum()))
                    _add(out, "traj_abs2", float((err**2).sum()))
                    z = err.abs() / spread.clamp_min(1e-9)  # in units of the twin's own spread
                    _add(out, "traj_z", float(z.sum()))
                    _add(out, "traj_z2", float((z**2).sum()))
        out["oracle_points"] = oracle_points
        return out

    def _horizon_requests(self, holdout: TwinHoldout) -> list[PathRequest]:
        """The paths `_horizon_statistics` reads: from every visit (the origin), the mean and
        SAMPLES sampled paths of the patients observed there and later, each up to its last
        observed visit (patients with no later visit have no error to add)."""
        observed = torch.isfinite(holdout.trajectory)
        last = (observed * torch.arange(self.horizon + 1)).amax(1)
        requests = []
        for origin in range(self.horizon):
            rows = torch.nonzero(observed[:, origin] & (last > origin)).squeeze(1)
            requests.append(PathRequest(rows, origin, holdout.arm[rows], last[rows], SAMPLES))
        return requests

    def _oracle(self, holdout: TwinHoldout, rows, observed, visit: int):
        idx = rows.numpy()
        y = holdout.trajectory[rows].numpy()
        return self.oracle.forecast(
            {k: v[idx] for k, v in holdout.covariates.items()},
            holdout.arm.double().numpy()[idx],
            np.where(observed.numpy(), y, 0.0),
            observed.numpy(),
            np.full(len(idx), visit),
        )

    def _effect_requests(self, holdout: TwinHoldout) -> list[PathRequest]:
        """The paths `_effect_statistics` reads: from baseline, the mean paths of the patients
        observed at the last visit, under control (arm 0) and under treatment (arm 1)."""
        final = torch.nonzero(torch.isfinite(holdout.trajectory[:, -1])).squeeze(1)
        until = torch.full((len(final),), self.horizon)
        return [PathRequest(final, 0, torch.full((len(final),), a), until) for a in (0.0, 1.0)]

    def _effect_statistics(self, holdout: TwinHoldout, paths: list[tuple]) -> dict:
        """Treatment-effect sums at the last visit, over patients observed there: PROCOVA's
        prognostic score is the control twin's forecast from baseline (arm 0); the twin's own
        effect is its forecast under treatment minus under control (the paths of
        `_effect_requests`)."""
        y = holdout.trajectory
        final = torch.isfinite(y[:, -1])
        (control, *_), (treated, *_) = paths
        return effect_statistics(
            holdout.arm.double()[final].numpy(),
            control[:, -1].numpy(),
            y[final, -1].numpy(),
            (treated - control)[:, -1].numpy(),
        )

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
        points = covered = 0.0
        for h in range(1, self.horizon + 1):
            count = statistics.get(f"h{h}_n", 0.0)
            if not count:
                continue
            points += count
            covered += statistics[f"h{h}_cov"]
            out[f"mae_h{h}"] = statistics[f"h{h}_abs"] / count
            out[f"rmse_h{h}"] = math.sqrt(statistics[f"h{h}_sq"] / count)
            out[f"coverage90_h{h}"] = statistics[f"h{h}_cov"] / count
            out[f"naive_mae_h{h}"] = statistics[f"h{h}_naive_abs"] / count
        for h in range(1, self.horizon + 1):
            count = statistics.get(f"b{h}_n", 0.0)
            if count:
                out[f"baseline_mae_h{h}"] = statistics[f"b{h}_abs"] / count
                out[f"baseline_rmse_h{h}"] = math.sqrt(statistics[f"b{h}_sq"] / count)
        if points:
            out["coverage90_all"] = covered / points  # 90 % intervals, every horizon
        # the oracle's figures only where every point had one (all sites hold the truth)
        if points and statistics.get("oracle_points", 0.0) == points:
            for h in range(1, self.horizon + 1):
                count = statistics.get(f"h{h}_n", 0.0)
                if count:
                    out[f"oracle_mae_h{h}"] = statistics[f"h{h}_oracle_abs"] / count
                    out[f"oracle_rmse_h{h}"] = math.sqrt(statistics[f"h{h}_oracle_sq"] / count)
                    out[f"oracle_coverage90_h{h}"] = statistics[f"h{h}_oracle_cov"] / count
                base = statistics.get(f"b{h}_n", 0.0)
                if base:
                    out[f"oracle_baseline_mae_h{h}"] = statistics[f"b{h}_oracle_abs"] / base
            if statistics.get("h1_n", 0.0):
                out["noise_floor"] = statistics["oracle_floor"] / statistics["h1_n"]
                out["mae_h1_vs_oracle"] = out["mae_h1"] / out["oracle_mae_h1"]
        out.update(effect_metrics(statistics))
        horizons = range(1, self.horizon + 1)
        count = sum(statistics.get(f"b{h}_n", 0.0) for h in horizons)
        if count:  # the forecast from baseline, every visit
            mean_abs = sum(statistics[f"b{h}_abs"] for h in horizons) / count
            out["trajectory_mae"] = mean_abs
            # standard error of that mean (errors of one patient's horizons taken as independent)
            variance = max(statistics["traj_abs2"] / count - mean_abs**2, 0.0)
            out["trajectory_mae_se"] = math.sqrt(variance / count)
            # the same errors in units of the twin's predicted spread: comparable across
            # extracts with more or fewer later visits (errors grow with the horizon, z does not)
            mean_z = statistics["traj_z"] / count
            out["trajectory_z"] = mean_z
            out["trajectory_z_se"] = math.sqrt(
                max(statistics["traj_z2"] / count - mean_z**2, 0.0) / count
            )
        return out


def _example_rows(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The next-visit examples of trajectories `y` (patients x visits, NaN where unobserved):
    the patient (row of `y`) and target visit of each, one per observed visit after baseline."""
    rows, targets = np.nonzero(np.isfinite(y)[:, 1:])
    return rows, targets + 1


def _add(out: dict[str, float], key: str, value: float) -> None:
    out[key] = out.get(key, 0.0) + value
