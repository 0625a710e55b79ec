"""The twin's fitness report and the coverage gate, by hand."""

from __future__ import annotations

import pytest

from twin_core.gates import coverage_gate
from twin_core.model_card import fitness_section
from twin_core.twin_report import Effect, twin_report

POOLED = {
    "coverage90_all": 0.88,
    "mae_h1": 1.1,
    "rmse_h1": 1.4,
    "coverage90_h1": 0.9,
    "naive_mae_h1": 1.5,
    "oracle_mae_h1": 1.0,
    "oracle_coverage90_h1": 0.9,
    "baseline_mae_h1": 1.2,
    "mae_h2": 1.3,
    "rmse_h2": 1.6,
    "coverage90_h2": 0.86,
    "naive_mae_h2": 2.0,
    "procova_ate": -2.0,
    "procova_se": 0.25,
    "unadjusted_ate": -1.0,
    "unadjusted_se": 1.0,
    "twin_ate": -2.5,
    "twin_se": 0.04,
    "variance_ratio": 0.0625,
    "noise_floor": 0.8,
}
TRUTH = {"pooled": {"true_ate": -2.4}, "sites": {"site-1": {"true_ate": -2.4}}}


def test_effects_meet_the_truth():
    report = twin_report(POOLED, {"site-1": POOLED}, horizon=2, truth=TRUTH)
    procova = report.effect("procova")
    assert procova.bias == pytest.approx(0.4)
    assert procova.ci95 == pytest.approx((-2.0 - 1.959964 * 0.25, -2.0 + 1.959964 * 0.25))
    assert procova.covers_truth is True  # -2.4 lies within -2.49 .. -1.51
    assert report.effect("twin").covers_truth is False  # -2.5 +- 0.078 stops short of -2.4
    assert report.effect("twin").ci95[1] == pytest.approx(-2.5 + 0.0784, abs=1e-4)
    assert report.effect("unadjusted").bias == pytest.approx(1.4)
    assert report.site_effects["site-1"][0].truth == -2.4


def test_horizons_and_headline():
    report = twin_report(POOLED, {}, horizon=2)
    first, second = report.horizons
    assert first.vs_oracle == pytest.approx(1.1) and first.baseline_mae == 1.2
    assert second.oracle_mae is None and second.vs_oracle is None
    headline = report.headline()
    assert headline["mae_h1_vs_oracle"] == pytest.approx(1.1)
    assert headline["coverage90_all"] == 0.88 and headline["variance_ratio"] == 0.0625
    assert "procova_bias" not in headline  # no truth here
    assert report.truth_known is False


def test_without_truth_nothing_is_compared_with_it():
    effect = Effect("procova", -2.0, 0.25)
    assert effect.bias is None and effect.covers_truth is None
    text = "\n".join(fitness_section(twin_report(POOLED, {}, 2).as_dict()))
    assert "bias against the true effect is unknown" in text
    assert "| 1 | 1.1 | 1.4 | 0.900 | 1.5 | 1 | 1.1 | 1.2 |  |" in text
    assert "about 6% of the patients" in text


def test_coverage_gate():
    assert coverage_gate(0.88, None).passed
    assert coverage_gate(0.88, (0.85, 0.95)).passed
    low = coverage_gate(0.80, (0.85, 0.95))
    assert not low.passed and low.detail == "90 % interval coverage 0.800 outside [0.85, 0.95]"
    assert not coverage_gate(0.97, (0.85, 0.95)).passed
    assert not coverage_gate(None, (0.85, 0.95)).passed
    assert coverage_gate(0.85, (0.85, 0.95)).passed  # bounds included
