"""The drift and performance trigger rules, with hand-computed cases."""

from __future__ import annotations

import pytest

from twin_core.monitoring import (
    DriftSummary,
    ExpectationOutcome,
    FeatureDrift,
    QualityReport,
    data_drift_triggers,
    performance_triggers,
)


def _summary(site: str, share: float, *, reference: bool = True, drifted=("y",)) -> DriftSummary:
    features = tuple(
        FeatureDrift(c, 0.001 if c in drifted else 0.5, "K-S p_value", 0.05, c in drifted)
        for c in ("age", "bmi", "sex", "y")
    )
    return DriftSummary(site, reference, share, share >= 0.5, 0.5, features, 100, 80, "", "r0003")


def test_data_drift_triggers_use_global_and_per_site_thresholds():
    summaries = {
        "a": _summary("a", 0.5, drifted=("y", "bmi")),
        "b": _summary("b", 0.25),
        "c": _summary("c", 0.75, reference=False),  # never trained: nothing to drift from
        "d": DriftSummary("d", True, 0.0, False, 0.5),  # windows too small: no decision
    }
    triggers = data_drift_triggers(summaries, 0.5)
    assert [(t.site_id, t.score, t.threshold, t.reference_round) for t in triggers] == [
        ("a", 0.5, 0.5, "r0003")
    ]
    assert (
        triggers[0].detail
        == "50% of columns drifted: bmi (K-S p_value 0.001), y (K-S p_value 0.001)"
    )
    # a stricter threshold for b alone, a laxer one for a
    triggers = data_drift_triggers(summaries, 0.5, {"b": 0.25, "a": 0.75})
    assert [t.site_id for t in triggers] == ["b"]


def test_performance_triggers_flag_relative_worsening_beyond_tolerance():
    at_registration = {"a": 2.0, "b": 1.0, "c": -1.0}
    now = {"a": 2.1, "b": 1.2, "c": -0.8, "new": 9.0}
    triggers = performance_triggers(now, at_registration, tolerance=0.10)
    # a: +5 % (within); b: +20 %; c: from -1.0 to -0.8 is +20 % worse; "new" has no baseline
    assert [(t.site_id, round(t.score, 6)) for t in triggers] == [("b", 0.2), ("c", 0.2)]
    assert triggers[0].detail == "loss 1 at registration, 1.2 now (+20.0%)"


def test_quality_report_summary_names_what_failed_and_how_much():
    report = QualityReport(
        "a",
        False,
        0.9,
        200,
        (
            ExpectationOutcome("expect_column_values_to_be_between", "age", False, 0.015),
            ExpectationOutcome("expect_column_values_to_not_be_null", "bmi", True, 0.0),
        ),
    )
    assert report.summary() == (
        "1 of 2 expectations failed: expect_column_values_to_be_between(age): 1.5% of rows"
    )
    assert [o.column for o in report.failed] == ["age"]
    ok = QualityReport("a", True, 1.0, 200, report.outcomes[1:])
    assert ok.summary() == "passed 1 expectations on 200 rows"


@pytest.mark.parametrize("share", [0.49, 0.0])
def test_below_threshold_never_triggers(share):
    assert data_drift_triggers({"a": _summary("a", share)}, 0.5) == []
