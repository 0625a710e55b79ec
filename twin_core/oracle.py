"""The oracle forecast: what the best possible twin would say, knowing how the cohort was made.

On the synthetic cohort every trajectory is a straight line, z(t) = A + B t, observed with the
site's calibration bias and noise: y_j = A + B t_j + kappa_s + eps_j, eps_j ~ N(0, sigma_s^2)
(reference/twin-model.md). Given a patient's observed covariates, the generator's true
parameters make (A, B) a known distribution; given the visits observed so far, Bayes' rule
updates it. The oracle's forecast of a later visit is the posterior predictive: no model trained
on the same observed history can do better on average, so the twin is judged against it.

The prior over (A, B) given the covariates is moment-matched to a Gaussian, exactly: severity is
latent, and given BMI it is normal, sev | bmi ~ N(m, v) (bmi = 27 + 0.8 sev + 4 z, sev ~
N(delta_s, 1)); A is linear in sev and B has a sev^2 term (lambda sev^2 / T), whose mean,
variance and covariance with sev are known in closed form. Missing visits and dropout depend on
observed values only (MCAR, MAR), so the posterior ignores them. Dropout, rounding and clipping
of age and BMI are not modelled (the clipping binds for < 0.1 % of patients). Drift is not
modelled: the oracle is the pre-drift truth.

Read by evaluation only: a site that holds the generator's truth (`truth/summary.json`) reports
the oracle's errors beside the twin's. Training never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from twin_core.cohort import SiteProfile, TrajectoryParams

_BMI_MEAN, _BMI_SLOPE, _BMI_SD = 27.0, 0.8, 4.0  # bmi = 27 + 0.8 sev + 4 z in the generator


@dataclass(frozen=True)
class GaussianForecast:
    mean: np.ndarray
    sd: np.ndarray


@dataclass(frozen=True)
class Oracle:
    """The generator's truth for one site: its profile and the trajectory parameters."""

    params: TrajectoryParams
    site: SiteProfile

    @property
    def noise_floor(self) -> float:
        """E|eps| = sigma_s sqrt(2/pi): the MAE of a forecast that knew z exactly."""
        return self.site.noise_sd * math.sqrt(2.0 / math.pi)

    @classmethod
    def from_summary(cls, summary: Mapping, site_id: str) -> Oracle:
        """The oracle of `site_id` from a cohort's truth summary (`truth/summary.json`)."""
        sites = summary.get("sites", {})
        if site_id not in sites:
            raise KeyError(f"site {site_id!r} is not in the truth summary (has {sorted(sites)})")
        profile = sites[site_id].get("profile")
        if profile is None:
            raise KeyError(
                f"the truth summary has no profile for {site_id!r}; regenerate the cohort"
            )
        return cls(TrajectoryParams(**summary["params"]), SiteProfile(**profile))

    def prior(
        self, age: np.ndarray, sex: np.ndarray, bmi: np.ndarray, arm: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean (n, 2) and covariance (n, 2, 2) of (A, B) given the observed covariates."""
        p, s = self.params, self.site
        age, sex, bmi, arm = (np.asarray(v, dtype=np.float64) for v in (age, sex, bmi, arm))
        x_age = (age - 60.0) / 10.0
        precision = 1.0 + _BMI_SLOPE**2 / _BMI_SD**2
        v = 1.0 / precision
        m = v * (s.severity_shift + _BMI_SLOPE * (bmi - _BMI_MEAN) / _BMI_SD**2)
        m = np.broadcast_to(m, x_age.shape)
        # B = gamma0 + gamma_age x_age - tau a + c sev + q sev^2 + u1, tau_i = tau (1 + rho sev)
        q = p.lam / p.horizon
        c = p.gamma_sev - p.tau * p.rho * arm
        mean_a = p.beta0 + p.beta_age * x_age + p.beta_sev * m + p.beta_sex * sex
        mean_b = p.gamma0 + p.gamma_age * x_age - p.tau * arm + c * m + q * (m**2 + v)
        var_sev2 = 4.0 * m**2 * v + 2.0 * v**2
        cov_sev_sev2 = 2.0 * m * v
        var_a = p.beta_sev**2 * v + p.sd_u0**2
        var_b = c**2 * v + q**2 * var_sev2 + 2.0 * c * q * cov_sev_sev2 + p.sd_u1**2
        cov_ab = p.beta_sev * (c * v + q * cov_sev_sev2)
        mean = np.stack([mean_a, mean_b], axis=-1)
        cov = np.empty(x_age.shape + (2, 2))
        cov[..., 0, 0] = var_a
        cov[..., 1, 1] = var_b
        cov[..., 0, 1] = cov[..., 1, 0] = cov_ab
        return mean, cov

    def forecast(
        self,
        covariates: Mapping[str, np.ndarray],
        arm: np.ndarray,
        history: np.ndarray,
        mask: np.ndarray,
        target_visit: np.ndarray,
    ) -> GaussianForecast:
        """Posterior predictive of y at `target_visit` given the visits where `mask` is set.

        covariates: "age", "sex", "bmi" per row; history, mask: (n, T + 1), visit j at t = j.
        """
        mean0, cov0 = self.prior(covariates["age"], covariates["sex"], covariates["bmi"], arm)
        sigma2 = self.site.noise_sd**2
        mask = np.asarray(mask, dtype=np.float64)
        y = np.nan_to_num(np.asarray(history, dtype=np.float64)) - self.site.calibration_bias
        t = np.arange(mask.shape[1], dtype=np.float64)[None, :]
        # posterior precision and information vector of (A, B): prior plus the observed visits
        prior_precision = np.linalg.inv(cov0)
        gram = np.empty_like(cov0)
        gram[:, 0, 0] = mask.sum(1)
        gram[:, 0, 1] = gram[:, 1, 0] = (mask * t).sum(1)
        gram[:, 1, 1] = (mask * t * t).sum(1)
        info = np.stack([(mask * y).sum(1), (mask * y * t).sum(1)], axis=-1)
        post_cov = np.linalg.inv(prior_precision + gram / sigma2)
        post_mean = np.einsum(
            "nij,nj->ni", post_cov, np.einsum("nij,nj->ni", prior_precision, mean0) + info / sigma2
        )
        x = np.stack([np.ones(len(target_visit)), np.asarray(target_visit, np.float64)], -1)
        mean = np.einsum("ni,ni->n", x, post_mean) + self.site.calibration_bias
        var = np.einsum("ni,nij,nj->n", x, post_cov, x) + sigma2
        return GaussianForecast(mean, np.sqrt(var))
