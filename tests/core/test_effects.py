"""PROCOVA and the twin's counterfactual effect from sufficient statistics."""

from __future__ import annotations

import numpy as np
import pytest

from twin_core.effects import (
    EFFECT_STATISTICS,
    MIN_PATIENTS,
    effect_statistics,
    treatment_effects,
)


def _trial(n: int, effect: float, rng: np.random.Generator, noise: float = 1.0):
    prognosis = rng.normal(10.0, 3.0, n)  # a good control-twin forecast explains most of y
    arm = rng.permutation(np.arange(n) % 2)
    outcome = prognosis + effect * arm + rng.normal(0.0, noise, n)
    counterfactual = np.full(n, effect) + rng.normal(0.0, 0.1, n)
    return arm, prognosis, outcome, counterfactual


def test_procova_equals_ordinary_least_squares_on_the_rows():
    arm, m, y, d = _trial(200, -2.4, np.random.default_rng(0))
    effects = treatment_effects(effect_statistics(arm, m, y, d))
    x = np.column_stack([np.ones_like(m), arm, m])
    beta, rss, *_ = np.linalg.lstsq(x, y, rcond=None)
    se = np.sqrt(rss[0] / (len(y) - 3) * np.linalg.inv(x.T @ x)[1, 1])
    assert effects.procova.estimate == pytest.approx(beta[1], rel=1e-9)
    assert effects.procova.se == pytest.approx(se, rel=1e-9)
    # unadjusted: the difference of means
    diff = y[arm == 1].mean() - y[arm == 0].mean()
    assert effects.unadjusted.estimate == pytest.approx(diff, rel=1e-9)
    assert effects.twin_counterfactual.estimate == pytest.approx(d.mean(), rel=1e-12)


def test_sites_sums_add_up_to_the_pooled_estimate():
    rng = np.random.default_rng(1)
    sites = [_trial(n, -2.4, rng) for n in (40, 120, 300)]
    pooled_rows = [np.concatenate(parts) for parts in zip(*sites, strict=True)]
    per_site = [effect_statistics(*site) for site in sites]
    summed = {k: sum(s[k] for s in per_site) for k in per_site[0]}
    a, b = treatment_effects(summed), treatment_effects(effect_statistics(*pooled_rows))
    assert a.procova.estimate == pytest.approx(b.procova.estimate, rel=1e-9)
    assert a.variance_ratio == pytest.approx(b.variance_ratio, rel=1e-9)


def test_a_prognostic_twin_shrinks_the_variance_and_intervals_cover_the_truth():
    rng = np.random.default_rng(2)
    covered, ratios = 0, []
    for _ in range(300):
        effects = treatment_effects(effect_statistics(*_trial(200, -2.4, rng)))
        covered += effects.procova.covers(-2.4)
        ratios.append(effects.variance_ratio)
    # R^2 of m for y is 9 / 10 here: the variance ratio is about 1 - 0.9 = 0.1
    assert np.mean(ratios) == pytest.approx(0.1, abs=0.02)
    assert 0.92 <= covered / 300 <= 0.98


def test_too_few_patients_is_a_clear_error():
    five = effect_statistics([0, 1, 0, 1, 0], [1.0, 2, 3, 4, 5], [1.0, 2, 3, 4, 6], [0.0] * 5)
    with pytest.raises(ValueError, match="too few"):
        treatment_effects({**five, "eff_n": 3.0})  # as if pooled from three patients


def test_a_site_with_fewer_patients_than_the_minimum_sends_nothing():
    """Sums of outcomes over one or two patients would give their values away."""
    few = effect_statistics([0, 1], [1.0, 2.0], [11.5, 9.25], [-1.0, -1.0])
    assert set(few.values()) == {0.0} and len(few) == len(EFFECT_STATISTICS)
    enough = effect_statistics(*_trial(MIN_PATIENTS, -2.4, np.random.default_rng(3)))
    assert enough["eff_n"] == MIN_PATIENTS and enough["eff_yy"] > 0
    # a suppressed site just does not count in the pooled sums
    rng = np.random.default_rng(4)
    big = _trial(200, -2.4, rng)
    pooled = {k: v + few[k] for k, v in effect_statistics(*big).items()}
    assert treatment_effects(pooled).procova == treatment_effects(effect_statistics(*big)).procova
