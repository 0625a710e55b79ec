"""Is the twin fit for trial simulation? Its round figures, read together, against the truth.

From the pooled and per-site metrics of a round (which sites computed from sums, see
tasks/patient_twin.py and effects.py): forecast error and interval coverage by horizon beside
the last observed value and the oracle; treatment effects with 95 % intervals; and, on the
synthetic cohort, bias against the generator's true effect (read from its truth summary here,
by evaluation only; training never sees it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from twin_core.effects import Z975


@dataclass(frozen=True)
class HorizonRow:
    """Forecasts h visits ahead of every observed visit (and, baseline_*, of baseline only)."""

    horizon: int
    mae: float
    rmse: float
    coverage90: float
    naive_mae: float
    oracle_mae: float | None = None
    oracle_coverage90: float | None = None
    baseline_mae: float | None = None  # from baseline alone: the visit h
    baseline_rmse: float | None = None
    oracle_baseline_mae: float | None = None

    @property
    def vs_oracle(self) -> float | None:
        return self.mae / self.oracle_mae if self.oracle_mae else None


@dataclass(frozen=True)
class Effect:
    """One estimate of the treatment effect at the last visit, and how it meets the truth."""

    method: str
    estimate: float
    se: float
    truth: float | None = None

    @property
    def ci95(self) -> tuple[float, float]:
        return self.estimate - Z975 * self.se, self.estimate + Z975 * self.se

    @property
    def bias(self) -> float | None:
        return None if self.truth is None else self.estimate - self.truth

    @property
    def covers_truth(self) -> bool | None:
        if self.truth is None:
            return None
        low, high = self.ci95
        return low <= self.truth <= high


@dataclass(frozen=True)
class TwinReport:
    horizons: tuple[HorizonRow, ...]
    coverage90: float  # over every horizon's forecasts
    effects: tuple[Effect, ...]
    variance_ratio: float | None
    noise_floor: float | None
    site_effects: dict[str, tuple[Effect, ...]] = field(default_factory=dict)
    site_vs_oracle: dict[str, float] = field(default_factory=dict)
    truth_known: bool = False

    def effect(self, method: str) -> Effect | None:
        return next((e for e in self.effects if e.method == method), None)

    def as_dict(self) -> dict:
        doc = asdict(self)
        doc["horizons"] = [{**asdict(r), "vs_oracle": r.vs_oracle} for r in self.horizons]
        doc["effects"] = [_effect_doc(e) for e in self.effects]
        doc["site_effects"] = {
            s: [_effect_doc(e) for e in effects] for s, effects in self.site_effects.items()
        }
        return doc

    def headline(self) -> dict[str, float]:
        """The figures a registry or a gate reads, flat and finite."""
        out: dict[str, float] = {"coverage90_all": self.coverage90}
        h1 = self.horizons[0] if self.horizons else None
        if h1 is not None:
            out["mae_h1"] = h1.mae
            if h1.vs_oracle is not None:
                out["mae_h1_vs_oracle"] = h1.vs_oracle
        for e in self.effects:
            out[f"{e.method}_ate"], out[f"{e.method}_se"] = e.estimate, e.se
            if e.bias is not None:
                out[f"{e.method}_bias"] = e.bias
        if self.variance_ratio is not None:
            out["variance_ratio"] = self.variance_ratio
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def _effect_doc(e: Effect) -> dict:
    return {**asdict(e), "ci95": e.ci95, "bias": e.bias, "covers_truth": e.covers_truth}


def _effects(metrics: Mapping[str, float], truth: float | None) -> tuple[Effect, ...]:
    out = []
    for method in ("procova", "unadjusted", "twin"):
        if f"{method}_ate" in metrics and f"{method}_se" in metrics:
            out.append(Effect(method, metrics[f"{method}_ate"], metrics[f"{method}_se"], truth))
    return tuple(out)


def horizon_rows(metrics: Mapping[str, float], horizon: int) -> tuple[HorizonRow, ...]:
    return tuple(
        HorizonRow(
            h,
            metrics[f"mae_h{h}"],
            metrics[f"rmse_h{h}"],
            metrics[f"coverage90_h{h}"],
            metrics[f"naive_mae_h{h}"],
            metrics.get(f"oracle_mae_h{h}"),
            metrics.get(f"oracle_coverage90_h{h}"),
            metrics.get(f"baseline_mae_h{h}"),
            metrics.get(f"baseline_rmse_h{h}"),
            metrics.get(f"oracle_baseline_mae_h{h}"),
        )
        for h in range(1, horizon + 1)
        if f"mae_h{h}" in metrics
    )


def twin_report(
    pooled: Mapping[str, float],
    per_site: Mapping[str, Mapping[str, float]],
    horizon: int,
    truth: Mapping | None = None,
) -> TwinReport:
    """Read a round's twin metrics together; `truth` is a cohort's truth summary, if known."""
    true_pooled = truth["pooled"]["true_ate"] if truth else None
    true_sites = {s: v.get("true_ate") for s, v in (truth or {}).get("sites", {}).items()}
    return TwinReport(
        horizons=horizon_rows(pooled, horizon),
        coverage90=pooled.get("coverage90_all", math.nan),
        effects=_effects(pooled, true_pooled),
        variance_ratio=pooled.get("variance_ratio"),
        noise_floor=pooled.get("noise_floor"),
        site_effects={
            s: _effects(m, true_sites.get(s)) for s, m in per_site.items() if "procova_ate" in m
        },
        site_vs_oracle={
            s: m["mae_h1_vs_oracle"] for s, m in per_site.items() if "mae_h1_vs_oracle" in m
        },
        truth_known=truth is not None,
    )
