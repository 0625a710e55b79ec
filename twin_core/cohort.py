"""Seeded synthetic multi-site patient cohort with optional drift injection.

Implements the "Seeded generator" and "Drift injection" sections of
``shared/reference/twin-model.md``. Pure numpy/pandas/pyyaml.

Conventions beyond the spec:
  * Each site draws from its own child of ``SeedSequence(seed).spawn(n_sites)``
    in a fixed order and amount, so sites are independent of each other and of
    drift. Drift needs no extra randomness: covariate shift moves the same
    standardised draws, concept shift is deterministic. Hence a site's data up
    to d* is identical with and without drift.
  * Dropout uses the last *observed* standardised value (strictly MAR when a
    visit is MCAR-missing); z̄_j and σ_y come from the site's undrifted cohort,
    so drift changes the data but not the dropout rule.
  * ``y`` is rounded to 4 decimals, ``age`` to 1, ``bmi`` to 2 (clipped to
    [5, 80]); latent values in ``truth`` are not rounded.
  * ``true_effect_T`` and the summary ATEs are pre-drift (-τ_i·T); realised
    post-drift trajectories are in ``z_control``/``z_treated``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

DAYS_PER_UNIT = 60.0
ENROLMENT_DAYS = 365.0
DRIFT_KINDS = ("covariate_severity", "covariate_age", "concept_slope", "concept_effect")
_DEFAULT_MAGNITUDE = {
    "covariate_severity": 1.5,
    "covariate_age": 10.0,
    "concept_slope": 0.5,
    "concept_effect": 0.0,
}
OBS_COLUMNS = ("patient_id", "site", "arm", "age", "sex", "bmi", "visit", "t", "calendar_day", "y")
TRUTH_COLUMNS = ("patient_id", "site", "visit", "sev", "z_control", "z_treated", "true_effect_T")


@dataclass(frozen=True)
class SiteProfile:
    """One site of the generator (a row of the default table)."""

    site_id: str
    n_patients: int
    age_mean: float
    female_fraction: float
    severity_shift: float
    noise_sd: float
    calibration_bias: float
    missing_rate: float
    dropout_slope: float = 0.5


DEFAULT_SITES: tuple[SiteProfile, ...] = (
    SiteProfile("site-1", 20, 45.0, 0.3, -0.5, 0.5, 0.0, 0.05),
    SiteProfile("site-2", 60, 55.0, 0.5, 0.0, 1.0, 0.0, 0.10),
    SiteProfile("site-3", 150, 65.0, 0.6, 0.5, 1.0, 0.5, 0.15),
    SiteProfile("site-4", 400, 60.0, 0.5, 0.0, 1.5, 0.0, 0.20),
    SiteProfile("site-5", 1200, 70.0, 0.4, 1.0, 2.0, -0.3, 0.30),
)


def simulated_sites(n: int) -> tuple[SiteProfile, ...]:
    """`n` sites for scale simulations: the default five profiles in turn (the first is a
    site-1, the sixth another site-1, ...), ids zero-padded to the width of `n`
    ("site-001" .. "site-100"). `simulated_sites(5)` is the default table itself."""
    if n < 1:
        raise ValueError(f"a cohort needs at least one site, got {n}")
    width = len(str(n))
    return tuple(
        replace(DEFAULT_SITES[i % len(DEFAULT_SITES)], site_id=f"site-{i + 1:0{width}d}")
        for i in range(n)
    )


@dataclass(frozen=True)
class TrajectoryParams:
    """Fixed effects, treatment effect, random-effect SDs and horizon T."""

    beta0: float = 20.0
    beta_age: float = 1.0
    beta_sev: float = 3.0
    beta_sex: float = 0.5
    gamma0: float = 1.0
    gamma_age: float = 0.3
    gamma_sev: float = 0.5
    lam: float = 0.2
    tau: float = 0.4
    rho: float = 0.0
    sd_u0: float = 1.0
    sd_u1: float = 0.2
    horizon: int = 6


@dataclass(frozen=True)
class DriftSpec:
    """Drift injected at one site from calendar day ``day`` (d*) on.

    ``magnitude`` defaults per kind: Δsev 1.5, Δage 10, Δγ 0.5, post-change τ 0.0.
    """

    site_id: str
    kind: str
    day: float
    magnitude: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"unknown drift kind {self.kind!r}; expected one of {DRIFT_KINDS}")
        if not np.isfinite(self.day):
            raise ValueError(f"drift day must be finite, got {self.day!r}")
        mag = _DEFAULT_MAGNITUDE[self.kind] if self.magnitude is None else float(self.magnitude)
        if not np.isfinite(mag):
            raise ValueError(f"drift magnitude must be finite, got {self.magnitude!r}")
        object.__setattr__(self, "day", float(self.day))
        object.__setattr__(self, "magnitude", mag)

    @classmethod
    def parse(cls, text: str) -> DriftSpec:
        """Parse ``"site:kind:day[:magnitude]"``, e.g. ``"site-3:concept_slope:200:0.8"``."""
        parts = [p.strip() for p in str(text).split(":")]
        if len(parts) not in (3, 4) or not all(parts):
            raise ValueError(
                f"bad drift spec {text!r}; expected 'site:kind:day[:magnitude]', "
                f"e.g. 'site-3:covariate_severity:200'"
            )
        try:
            day = float(parts[2])
            mag = float(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise ValueError(
                f"bad drift spec {text!r}: day and magnitude must be numbers"
            ) from None
        return cls(parts[0], parts[1], day, mag)

    def manifest(self) -> dict:
        """Manifest entry ``{site, kind, day, magnitude}``."""
        return {
            "site": self.site_id,
            "kind": self.kind,
            "day": self.day,
            "magnitude": self.magnitude,
        }


@dataclass(frozen=True)
class CohortConfig:
    """Seed, sites, trajectory parameters and drift of a cohort."""

    seed: int = 7
    sites: tuple[SiteProfile, ...] = DEFAULT_SITES
    params: TrajectoryParams = TrajectoryParams()
    drift: tuple[DriftSpec, ...] = ()


@dataclass(frozen=True, eq=False)
class Cohort:
    """Generated cohort: observations (site data), truth (latent) and summary."""

    observations: pd.DataFrame
    truth: pd.DataFrame
    summary: dict

    def site(self, site_id: str) -> pd.DataFrame:
        """Observations of one site; raises KeyError for an unknown site."""
        known = list(self.summary["sites"])
        if site_id not in known:
            raise KeyError(f"unknown site {site_id!r}; known sites: {known}")
        return self.observations[self.observations["site"] == site_id].reset_index(drop=True)


def cohort_schema(params: TrajectoryParams = TrajectoryParams()) -> dict:
    """Declared data schema of the site CSVs (written to schema.yaml)."""
    return {
        "task": "patient_twin",
        "id_column": "patient_id",
        "visit_column": "visit",
        "arm_column": "arm",
        "calendar_column": "calendar_day",
        "target": "y",
        "horizon": int(params.horizon),
        "features": [
            {"name": "age", "kind": "numeric", "min": 18, "max": 90},
            {"name": "sex", "kind": "categorical", "categories": [0, 1]},
            {"name": "bmi", "kind": "numeric", "min": 5, "max": 80},
        ],
    }


def _covariates(s: SiteProfile, d: dict, drifts: list[DriftSpec]) -> tuple[np.ndarray, ...]:
    """Age, sev, bmi from standardised draws, with covariate shift after d*."""
    age_shift = sum(k.magnitude * (d["e"] > k.day) for k in drifts if k.kind == "covariate_age")
    sev_shift = sum(
        k.magnitude * (d["e"] > k.day) for k in drifts if k.kind == "covariate_severity"
    )
    age = np.round(np.clip(s.age_mean + age_shift + 10.0 * d["z_age"], 18.0, 90.0), 1)
    sev = s.severity_shift + sev_shift + d["z_sev"]
    bmi = np.round(np.clip(27.0 + 0.8 * sev + 4.0 * d["z_bmi"], 5.0, 80.0), 2)
    return age, sev, bmi


def _latent(p: TrajectoryParams, age, sev, d: dict, a, drifts: list[DriftSpec]) -> np.ndarray:
    """Latent z_i(t_j), shape (n, T+1), for arm vector ``a``; concept drift from d* on."""
    T = p.horizon
    t = np.arange(T + 1, dtype=float)[None, :]
    x_age = (age - 60.0) / 10.0
    tau_i = p.tau * (1.0 + p.rho * sev)
    level = p.beta0 + p.beta_age * x_age + p.beta_sev * sev + p.beta_sex * d["sex"] + d["u0"]
    slope = p.gamma0 + p.gamma_age * x_age + p.gamma_sev * sev + d["u1"] - tau_i * a
    z = level[:, None] + slope[:, None] * t + (p.lam * sev**2 / T)[:, None] * t
    for k in drifts:
        t_star = np.maximum((k.day - d["e"]) / DAYS_PER_UNIT, 0.0)
        post = np.maximum(t - t_star[:, None], 0.0)  # continuous at d*: slope change only
        if k.kind == "concept_slope":
            z = z + (k.magnitude * sev)[:, None] * post
        elif k.kind == "concept_effect":
            z = z - ((k.magnitude - p.tau) * (1.0 + p.rho * sev) * a)[:, None] * post
    return z


def _observed(s: SiteProfile, y, y_ref, z_ref, d: dict) -> np.ndarray:
    """Observed mask: baseline kept, MCAR per visit, then MAR dropout (absorbing)."""
    n, J = y.shape
    obs = d["u_mcar"] >= s.missing_rate
    obs[:, 0] = True
    sd = y_ref.std(axis=0)
    r = (y - z_ref.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    last = np.maximum.accumulate(np.where(obs, np.arange(J), 0), axis=1)
    r_locf = r[np.arange(n)[:, None], last]
    p_drop = 1.0 / (1.0 + np.exp(4.0 - s.dropout_slope * r_locf[:, :-1]))
    drop = d["u_drop"] < p_drop
    first = np.where(drop.any(axis=1), drop.argmax(axis=1), J - 1)
    return obs & (np.arange(J)[None, :] <= first[:, None])


def _site(
    s: SiteProfile, p: TrajectoryParams, rng: np.random.Generator, drifts: list[DriftSpec]
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Generate one site: observation rows, truth rows and site summary."""
    n, J = s.n_patients, p.horizon + 1
    d = {
        "e": rng.uniform(0.0, ENROLMENT_DAYS, n),
        "z_age": rng.standard_normal(n),
        "sex": (rng.random(n) < s.female_fraction).astype(np.int64),
        "z_sev": rng.standard_normal(n),
        "z_bmi": rng.standard_normal(n),
    }
    arm = rng.permutation(np.r_[np.ones(n // 2), np.zeros(n - n // 2)]).astype(np.int64)
    d["u0"] = p.sd_u0 * rng.standard_normal(n)
    d["u1"] = p.sd_u1 * rng.standard_normal(n)
    eps = s.noise_sd * rng.standard_normal((n, J))
    d["u_mcar"], d["u_drop"] = rng.random((n, J)), rng.random((n, J - 1))

    def arms(covs, dr):
        age, sev, _ = covs
        z0, z1 = _latent(p, age, sev, d, 0.0, dr), _latent(p, age, sev, d, 1.0, dr)
        return z0, z1, np.where(arm[:, None] == 1, z1, z0)

    age, sev, bmi = covs = _covariates(s, d, drifts)
    z0, z1, z = arms(covs, drifts)
    y = z + s.calibration_bias + eps
    if drifts:
        z_ref = arms(_covariates(s, d, []), [])[2]
        y_ref = z_ref + s.calibration_bias + eps
    else:
        z_ref, y_ref = z, y
    obs = _observed(s, y, y_ref, z_ref, d)

    width = max(4, len(str(n)))
    ids = np.array([f"{s.site_id}-{i + 1:0{width}d}" for i in range(n)], dtype=object)
    visit = np.tile(np.arange(J, dtype=np.int64), n)
    rep = lambda v: np.repeat(v, J)  # noqa: E731
    site_col = np.full(n * J, s.site_id, dtype=object)
    obs_df = pd.DataFrame(
        {
            "patient_id": rep(ids),
            "site": site_col,
            "arm": rep(arm),
            "age": rep(age),
            "sex": rep(d["sex"]),
            "bmi": rep(bmi),
            "visit": visit,
            "t": visit.astype(float),
            "calendar_day": rep(d["e"]) + DAYS_PER_UNIT * visit,
            "y": np.where(obs, np.round(y, 4), np.nan).ravel(),
        }
    )
    effect = -p.tau * (1.0 + p.rho * sev) * p.horizon
    truth_df = pd.DataFrame(
        {
            "patient_id": rep(ids),
            "site": site_col.copy(),
            "visit": visit,
            "sev": rep(sev),
            "z_control": z0.ravel(),
            "z_treated": z1.ravel(),
            "true_effect_T": rep(effect),
        }
    )
    summary = {
        "profile": asdict(s),
        "n_patients": n,
        "n_treated": int(arm.sum()),
        "n_control": int(n - arm.sum()),
        "n_rows": n * J,
        "n_observed_y": int(obs.sum()),
        "true_ate": _ate(p, s.severity_shift),
        "sample_ate": round(float(effect.mean()), 12),
        "drift": [k.manifest() for k in drifts],
    }
    return obs_df, truth_df, summary


def _ate(p: TrajectoryParams, mean_sev: float) -> float:
    """True ATE at T, -tau*T*(1+rho*E[x_sev]), rounded to 12 decimals (float noise)."""
    return round(-p.tau * p.horizon * (1.0 + p.rho * mean_sev), 12)


def generate_cohort(config: CohortConfig = CohortConfig()) -> Cohort:
    """Generate the seeded multi-site cohort described by ``config``."""
    ids = [s.site_id for s in config.sites]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"need at least one site and unique site ids, got {ids}")
    if any(s.n_patients < 1 for s in config.sites):
        raise ValueError("every site needs n_patients >= 1")
    seen = set()
    for k in config.drift:
        if k.site_id not in ids:
            raise ValueError(f"drift {k.manifest()} targets unknown site; known sites: {ids}")
        if (k.site_id, k.kind) in seen:
            raise ValueError(f"duplicate drift {k.kind!r} at {k.site_id!r}")
        seen.add((k.site_id, k.kind))
    p = config.params
    children = np.random.SeedSequence(config.seed).spawn(len(config.sites))
    obs, truth, per_site = [], [], {}
    for s, child in zip(config.sites, children, strict=True):
        drifts = [k for k in config.drift if k.site_id == s.site_id]
        o, t, summ = _site(s, p, np.random.default_rng(child), drifts)
        obs.append(o)
        truth.append(t)
        per_site[s.site_id] = summ
    n_total = sum(s.n_patients for s in config.sites)
    sample_sum = float(sum(v["sample_ate"] * v["n_patients"] for v in per_site.values()))
    mean_sev = sum(s.n_patients * s.severity_shift for s in config.sites) / n_total
    summary = {
        "seed": int(config.seed),
        "params": asdict(p),
        "sites": per_site,
        "pooled": {
            "n_patients": n_total,
            "true_ate": _ate(p, mean_sev),
            "sample_ate": round(sample_sum / n_total, 12),
        },
        "ate_note": "true ATEs are pre-drift: -tau*T*(1+rho*E[x_sev]), E_s[x_sev] = severity_shift",
        "drift": [k.manifest() for k in config.drift],
    }
    return Cohort(pd.concat(obs, ignore_index=True), pd.concat(truth, ignore_index=True), summary)


def showcase_cohort(summary: dict, patients_per_site: int = 40, seed_offset: int = 1_000_003):
    """Fresh synthetic patients from a cohort's generator (its sites' profiles and trajectory
    parameters, another seed): to picture forecasts without using any site's patients."""
    sites = tuple(
        SiteProfile(**{**v["profile"], "n_patients": patients_per_site})
        for v in summary["sites"].values()
    )
    config = CohortConfig(
        seed=int(summary["seed"]) + seed_offset,
        sites=sites,
        params=TrajectoryParams(**summary["params"]),
    )
    return generate_cohort(config)


def write_cohort(cohort: Cohort, out_dir: Path) -> dict[str, Path]:
    """Write site CSVs, truth (own folder), drift manifest and schema; return their paths."""
    out_dir = Path(out_dir)
    (out_dir / "sites").mkdir(parents=True, exist_ok=True)
    (out_dir / "truth").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for site_id in cohort.summary["sites"]:
        paths[site_id] = out_dir / "sites" / f"{site_id}.csv"
        cohort.site(site_id).to_csv(paths[site_id], index=False)
    paths["truth"] = out_dir / "truth" / "truth.csv"
    cohort.truth.to_csv(paths["truth"], index=False)
    paths["summary"] = out_dir / "truth" / "summary.json"
    paths["summary"].write_text(json.dumps(cohort.summary, indent=2))
    paths["schema"] = out_dir / "schema.yaml"
    params = TrajectoryParams(**cohort.summary["params"])
    paths["schema"].write_text(yaml.safe_dump(cohort_schema(params), sort_keys=False))
    paths["drift"] = out_dir / "drift.json"
    paths["drift"].write_text(json.dumps(cohort.summary["drift"], indent=2))
    return paths
