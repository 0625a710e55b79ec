"""Treatment effects from site-level sufficient statistics: PROCOVA and the twin's counterfactual.

PROCOVA (Schuler et al., "Increasing the efficiency of randomized trial estimates via linear
adjustment for a prognostic score", Int J Biostat 2022; EMA qualification opinion 2022): regress
the outcome on 1, the arm and the control-twin forecast m (the prognostic score); the arm's
coefficient estimates the treatment effect with a smaller variance than the unadjusted difference
of means, by about 1 - R^2 of m for the outcome.

A site sends only sums and cross-products of (1, a, m, y) and of the twin's counterfactual
differences; OLS needs nothing more, so no per-patient value leaves the site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Z975 = 1.959963984540054  # normal quantile for 95 % intervals (n is in the hundreds here)

# A site with fewer patients than this sends zeros for the effect sums: a sum of outcomes over
# one or two patients would give their values away (a minimum cell size, as in federated
# analysis systems). Its patients then simply do not count in the pooled effect.
MIN_PATIENTS = 5

EFFECT_STATISTICS = (
    "eff_n",
    "eff_a",
    "eff_m",
    "eff_y",
    "eff_aa",
    "eff_am",
    "eff_mm",
    "eff_ay",
    "eff_my",
    "eff_yy",
    "eff_cf",
    "eff_cf2",
)


def effect_statistics(
    arm: np.ndarray, prognosis: np.ndarray, outcome: np.ndarray, counterfactual: np.ndarray
) -> dict[str, float]:
    """Sums over a site's patients with an observed outcome (site side); all zeros below
    MIN_PATIENTS patients.

    arm: 0/1; prognosis: the control-twin forecast m of the outcome; outcome: y;
    counterfactual: the twin's forecast under treatment minus under control.
    """
    a, m, y, d = (
        np.asarray(v, dtype=np.float64) for v in (arm, prognosis, outcome, counterfactual)
    )
    if a.size < MIN_PATIENTS:
        return dict.fromkeys(EFFECT_STATISTICS, 0.0)
    return {
        "eff_n": float(a.size),
        "eff_a": float(a.sum()),
        "eff_m": float(m.sum()),
        "eff_y": float(y.sum()),
        "eff_aa": float(a @ a),
        "eff_am": float(a @ m),
        "eff_mm": float(m @ m),
        "eff_ay": float(a @ y),
        "eff_my": float(m @ y),
        "eff_yy": float(y @ y),
        "eff_cf": float(d.sum()),
        "eff_cf2": float(d @ d),
    }


@dataclass(frozen=True)
class EffectEstimate:
    estimate: float
    se: float

    @property
    def ci95(self) -> tuple[float, float]:
        return self.estimate - Z975 * self.se, self.estimate + Z975 * self.se

    def covers(self, truth: float) -> bool:
        low, high = self.ci95
        return low <= truth <= high


@dataclass(frozen=True)
class TreatmentEffects:
    procova: EffectEstimate
    unadjusted: EffectEstimate
    twin_counterfactual: EffectEstimate  # mean forecast difference, its SE across patients

    @property
    def variance_ratio(self) -> float:
        """SE^2 of PROCOVA over SE^2 of the unadjusted estimate: the sample-size factor."""
        return (self.procova.se / self.unadjusted.se) ** 2 if self.unadjusted.se else math.nan


def _ols_arm(xtx: np.ndarray, xty: np.ndarray, yty: float, n: float) -> EffectEstimate:
    """The coefficient of the arm (column 1) in OLS, with its classical standard error."""
    beta = np.linalg.solve(xtx, xty)
    rss = max(yty - float(beta @ xty), 0.0)
    sigma2 = rss / (n - len(xty))
    covariance = sigma2 * np.linalg.inv(xtx)
    return EffectEstimate(float(beta[1]), math.sqrt(max(covariance[1, 1], 0.0)))


def treatment_effects(stats: Mapping[str, float]) -> TreatmentEffects:
    """PROCOVA, unadjusted and counterfactual effects from (pooled) effect statistics."""
    s = {k: float(stats[k]) for k in EFFECT_STATISTICS}
    n = s["eff_n"]
    if n < 4:
        raise ValueError(f"{n:.0f} patients are too few to estimate a treatment effect")
    xtx = np.array(
        [
            [n, s["eff_a"], s["eff_m"]],
            [s["eff_a"], s["eff_aa"], s["eff_am"]],
            [s["eff_m"], s["eff_am"], s["eff_mm"]],
        ]
    )
    xty = np.array([s["eff_y"], s["eff_ay"], s["eff_my"]])
    procova = _ols_arm(xtx, xty, s["eff_yy"], n)
    unadjusted = _ols_arm(xtx[:2, :2], xty[:2], s["eff_yy"], n)
    mean_cf = s["eff_cf"] / n
    var_cf = max(s["eff_cf2"] / n - mean_cf**2, 0.0) * n / (n - 1)
    return TreatmentEffects(procova, unadjusted, EffectEstimate(mean_cf, math.sqrt(var_cf / n)))


def effect_metrics(stats: Mapping[str, float]) -> dict[str, float]:
    """The effect estimates as named metrics, or nothing when the sums cannot support them
    (too few patients, or one arm only, as at a small site's holdout)."""
    if stats.get("eff_n", 0.0) < 4 or not 0 < stats.get("eff_a", 0.0) < stats["eff_n"]:
        return {}
    try:
        effects = treatment_effects(stats)
    except np.linalg.LinAlgError:
        return {}
    return {
        "procova_ate": effects.procova.estimate,
        "procova_se": effects.procova.se,
        "unadjusted_ate": effects.unadjusted.estimate,
        "unadjusted_se": effects.unadjusted.se,
        "variance_ratio": effects.variance_ratio,
        "twin_ate": effects.twin_counterfactual.estimate,
        "twin_se": effects.twin_counterfactual.se,
    }
