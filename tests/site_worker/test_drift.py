"""Drift at the site: unit tables, calendar windows and Evidently drift summaries on the seeded
cohort (seed 7) with and without injected drift."""

from __future__ import annotations

import dataclasses
import re
from functools import cache

import numpy as np
import pandas as pd
import pytest

from site_worker.drift import drift_summary, unit_table, window
from twin_core.cohort import CohortConfig, DriftSpec, cohort_schema, generate_cohort
from twin_core.monitoring import DriftSummary, FeatureDrift
from twin_core.schema import check_frame, parse_schema

SCHEMA = parse_schema(cohort_schema())
D_STAR = 180.0


@cache
def site_frame(site_id: str = "site-5", *drift: DriftSpec) -> pd.DataFrame:
    cohort = generate_cohort(CohortConfig(seed=7, drift=tuple(drift)))
    return check_frame(SCHEMA, cohort.site(site_id))


@cache
def site_units(site_id: str = "site-5", *drift: DriftSpec) -> pd.DataFrame:
    return unit_table(SCHEMA, site_frame(site_id, *drift))


def enrolment(frame: pd.DataFrame) -> pd.Series:
    """Each patient's enrolment day, straight from the long frame (first calendar day)."""
    return frame.groupby("patient_id")["calendar_day"].min()


def split_at_d_star(units: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    reference = window(SCHEMA, units, until_day=D_STAR)
    current = units[units["calendar_day"] > D_STAR]
    return reference, current


SEVERITY = DriftSpec("site-5", "covariate_severity", D_STAR)
AGE = DriftSpec("site-5", "covariate_age", D_STAR)


def by_column(summary: DriftSummary) -> dict[str, FeatureDrift]:
    return {f.column: f for f in summary.features}


def test_twin_unit_table_is_one_baseline_row_per_patient():
    frame = site_frame()
    units = site_units()
    assert list(units.columns) == ["age", "sex", "bmi", "y", "calendar_day"]
    assert len(units) == frame["patient_id"].nunique() == 1200
    baseline = frame[frame["visit"] == 0].sort_values("patient_id")
    np.testing.assert_array_equal(units["y"].to_numpy(), baseline["y"].to_numpy())
    np.testing.assert_array_equal(
        np.sort(units["calendar_day"].to_numpy()), np.sort(enrolment(frame).to_numpy())
    )
    assert units["y"].notna().all()


def test_tabular_unit_table_keeps_features_target_and_calendar():
    schema = parse_schema(
        {
            "task": "tabular",
            "target": "out",
            "calendar_column": "day",
            "id_column": "rid",
            "features": [{"name": "a"}, {"name": "b"}],
        }
    )
    frame = pd.DataFrame({"rid": ["r1", "r2", "r3"], "a": [1, 2, 3], "b": [4, 5, 6]})
    frame = check_frame(schema, frame.assign(out=[0.1, 0.2, 0.3], day=[10, 20, 30]))
    units = unit_table(schema, frame)
    assert list(units.columns) == ["a", "b", "out", "day"]
    assert len(units) == 3
    assert window(schema, units, until_day=20, days=15)["day"].tolist() == [10.0, 20.0]
    assert window(schema, units, until_day=20, days=10)["day"].tolist() == [20.0]


def test_window_selects_by_enrolment_day():
    frame, units = site_frame(), site_units()
    e = enrolment(frame)
    assert len(window(SCHEMA, units)) == len(units)
    assert len(window(SCHEMA, units, until_day=D_STAR)) == int((e <= D_STAR).sum())
    sel = window(SCHEMA, units, until_day=D_STAR, days=90)
    assert len(sel) == int(((e > 90) & (e <= D_STAR)).sum()) > 0
    last = window(SCHEMA, units, days=60)
    assert len(last) == int((e > e.max() - 60).sum()) > 0
    assert last["calendar_day"].max() == e.max()
    # bounds: the upper one is inclusive, the lower one exclusive
    day = float(np.sort(e.to_numpy())[500])
    assert window(SCHEMA, units, until_day=day)["calendar_day"].max() == day
    assert day not in window(SCHEMA, units, until_day=day + 30, days=30)["calendar_day"].tolist()


def test_window_without_calendar_returns_units_unchanged():
    schema = parse_schema({"task": "tabular", "target": "out", "features": [{"name": "a"}]})
    units = pd.DataFrame({"a": [1.0, 2.0], "out": [0.0, 1.0]})
    assert window(schema, units, until_day=0.0, days=1.0) is units


def test_no_injected_drift_no_dataset_drift():
    reference, current = split_at_d_star(site_units())
    s = drift_summary("site-5", SCHEMA, reference, current, drift_share=0.25)
    assert s.has_reference and not s.dataset_drift and s.drifted_share == 0.0
    assert (s.reference_rows, s.current_rows) == (len(reference), len(current)) == (572, 628)
    cols = by_column(s)
    assert set(cols) == {"age", "sex", "bmi", "y"}  # the calendar column is not compared
    assert {c: f.method for c, f in cols.items()} == {
        "age": "K-S p_value",
        "bmi": "K-S p_value",
        "y": "K-S p_value",
        "sex": "Z-test p_value",
    }
    assert all(f.threshold == 0.05 and f.score >= 0.05 for f in s.features)


def test_covariate_severity_shift_drifts_the_baseline_outcome():
    reference, current = split_at_d_star(site_units("site-5", SEVERITY))
    s = drift_summary("site-5", SCHEMA, reference, current, drift_share=0.25)
    cols = by_column(s)
    assert cols["y"].drifted and cols["y"].score < 1e-10  # baseline y moves by 4.5
    assert cols["bmi"].drifted  # bmi depends on severity
    assert not cols["age"].drifted and not cols["sex"].drifted
    assert s.drifted_share == 0.5 and s.dataset_drift
    for f in s.features:  # p-values: drifted exactly when below the threshold
        assert f.drifted == (f.score < f.threshold)
    # dataset drift is drifted_share >= drift_share, inclusive at the boundary
    assert drift_summary("site-5", SCHEMA, reference, current, drift_share=0.5).dataset_drift
    assert not drift_summary("site-5", SCHEMA, reference, current, drift_share=0.51).dataset_drift


def test_a_column_without_values_is_left_out():
    reference, current = split_at_d_star(site_units("site-5", SEVERITY))
    s = drift_summary("site-5", SCHEMA, reference, current.assign(bmi=np.nan))
    assert set(by_column(s)) == {"age", "sex", "y"}
    assert s.drifted_share == pytest.approx(1 / 3) and by_column(s)["y"].drifted


def test_covariate_shift_before_d_star_is_invisible():
    units = site_units("site-5", SEVERITY)
    reference = window(SCHEMA, units, until_day=90)
    current = window(SCHEMA, units, until_day=D_STAR, days=90)
    s = drift_summary("site-5", SCHEMA, reference, current, drift_share=0.25)
    assert s.features and not any(f.drifted for f in s.features)
    assert not s.dataset_drift


def test_covariate_age_shift_flags_age():
    reference, current = split_at_d_star(site_units("site-5", AGE))
    s = drift_summary("site-5", SCHEMA, reference, current)
    assert by_column(s)["age"].drifted and by_column(s)["age"].score < 1e-10
    assert not by_column(s)["bmi"].drifted


def test_large_reference_uses_distances_and_their_direction():
    # > 1000 reference rows: Evidently switches to distances, drifted when score >= threshold.
    # The reference (1200) is big and the current (628) is not, so this also pins the argument
    # order of Report.run(current, reference).
    reference = site_units()
    current = split_at_d_star(site_units("site-5", SEVERITY))[1]
    s = drift_summary("site-5", SCHEMA, reference, current)
    cols = by_column(s)
    assert cols["y"].method == "Wasserstein distance (normed)"
    assert cols["sex"].method == "Jensen-Shannon distance"
    assert cols["y"].drifted and cols["y"].score >= cols["y"].threshold == 0.1
    assert not cols["sex"].drifted
    for f in s.features:
        assert f.drifted == (f.score >= f.threshold)


def test_classification_target_is_compared_as_categorical():
    schema = parse_schema(
        {
            "task": "tabular",
            "problem": "classification",
            "classes": ["no", "yes"],
            "target": "out",
            "features": [{"name": "a"}],
        }
    )
    rng = np.random.default_rng(0)

    def units(p_yes: float) -> pd.DataFrame:
        out = np.where(rng.random(300) < p_yes, "yes", "no")
        return unit_table(
            schema, check_frame(schema, pd.DataFrame({"a": rng.normal(size=300), "out": out}))
        )

    s = drift_summary("t", schema, units(0.2), units(0.7))
    cols = by_column(s)
    assert cols["out"].method == "Z-test p_value" and cols["out"].drifted
    assert not cols["a"].drifted and cols["a"].method == "K-S p_value"


def test_without_reference_nothing_drifts():
    s = drift_summary("site-5", SCHEMA, None, site_units())
    assert not s.has_reference and not s.dataset_drift
    assert s.drifted_share == 0.0 and s.features == () and s.report_html == b""


def test_tiny_windows_give_no_decision():
    units = site_units("site-5", SEVERITY)
    reference, current = split_at_d_star(units)
    s = drift_summary("site-5", SCHEMA, reference, current.iloc[:9], min_rows=10)
    assert s.has_reference and not s.dataset_drift
    assert (s.drifted_share, s.features, s.reference_rows, s.current_rows) == (0.0, (), 572, 9)
    s = drift_summary("site-5", SCHEMA, reference.iloc[:9], current, min_rows=10)
    assert s.features == () and s.reference_rows == 9
    # at exactly min_rows a decision is made
    assert drift_summary("site-5", SCHEMA, reference, current.iloc[:10], min_rows=10).features


def test_report_html_only_when_shared():
    reference, current = split_at_d_star(site_units())
    assert drift_summary("site-5", SCHEMA, reference, current).report_html == b""
    html = drift_summary("site-5", SCHEMA, reference, current, share_report=True).report_html
    assert isinstance(html, bytes) and b"<html" in html.lower()


def test_summary_carries_only_aggregates():
    frame = site_frame("site-5", SEVERITY)
    reference, current = split_at_d_star(site_units("site-5", SEVERITY))
    s = drift_summary("site-5", SCHEMA, reference, current)
    text = repr(s)
    assert not any(pid in text for pid in frame["patient_id"].unique())
    assert [f.name for f in dataclasses.fields(FeatureDrift)] == [
        "column", "score", "method", "threshold", "drifted"
    ]  # fmt: skip
    allowed = {s.drifted_share, s.drift_share_threshold, s.reference_rows, s.current_rows}
    for f in s.features:
        assert type(f.score) is float and type(f.threshold) is float and type(f.drifted) is bool
        allowed |= {f.score, f.threshold}
    assert all(type(v) is float for v in (s.drifted_share, s.drift_share_threshold))
    assert type(s.reference_rows) is int and type(s.current_rows) is int
    # every number printed in the summary is one of those scores, thresholds, shares or counts
    numbers = re.findall(r"\d[\d.e+-]*", text.replace("'site-5'", ""))
    assert numbers and {float(n) for n in numbers} <= {float(v) for v in allowed}
