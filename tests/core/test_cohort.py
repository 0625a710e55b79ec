"""Tests for twin_core.cohort (seeded synthetic multi-site cohort + drift)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from twin_core.cohort import (
    DEFAULT_SITES,
    CohortConfig,
    DriftSpec,
    SiteProfile,
    TrajectoryParams,
    cohort_schema,
    generate_cohort,
    write_cohort,
)

OBS_COLS = ["patient_id", "site", "arm", "age", "sex", "bmi", "visit", "t", "calendar_day", "y"]
SITE_IDS = [f"site-{k}" for k in range(1, 6)]


@pytest.fixture(scope="module")
def base():
    return generate_cohort()


def _drifted(*specs: str):
    return generate_cohort(CohortConfig(drift=tuple(DriftSpec.parse(s) for s in specs)))


def test_determinism(base):
    again = generate_cohort(CohortConfig(seed=7))
    pd.testing.assert_frame_equal(base.observations, again.observations)
    pd.testing.assert_frame_equal(base.truth, again.truth)
    assert base.summary == again.summary
    other = generate_cohort(CohortConfig(seed=8))
    assert not base.observations["y"].equals(other.observations["y"])


def test_sizes_columns_dtypes(base):
    obs = base.observations
    assert list(obs.columns) == OBS_COLS
    sizes = obs.groupby("site")["patient_id"].nunique().to_dict()
    assert sizes == {"site-1": 20, "site-2": 60, "site-3": 150, "site-4": 400, "site-5": 1200}
    assert [s.site_id for s in DEFAULT_SITES] == SITE_IDS
    assert len(obs) == 1830 * 7 and obs["patient_id"].nunique() == 1830
    for col in ["arm", "sex", "visit"]:
        assert obs[col].dtype == np.int64, col
    for col in ["age", "bmi", "t", "calendar_day", "y"]:
        assert obs[col].dtype == np.float64, col
    for col in ["patient_id", "site"]:
        assert obs[col].map(type).eq(str).all(), col
    assert obs["patient_id"].iloc[0] == "site-1-0001"
    assert obs["age"].between(18, 90).all() and set(obs["sex"]) <= {0, 1}
    assert np.allclose(
        obs["calendar_day"] - obs.groupby("patient_id")["calendar_day"].transform("first"),
        60.0 * obs["t"],
    )
    assert obs["calendar_day"].groupby(obs["patient_id"]).first().between(0, 365).all()


def test_truth_lines_up_with_observations(base):
    truth = base.truth
    assert list(truth.columns) == [
        "patient_id",
        "site",
        "visit",
        "sev",
        "z_control",
        "z_treated",
        "true_effect_T",
    ]
    assert truth[["patient_id", "site", "visit"]].equals(
        base.observations[["patient_id", "site", "visit"]]
    )
    assert np.allclose(
        truth.loc[truth["visit"] == 0, "z_control"], truth.loc[truth["visit"] == 0, "z_treated"]
    )  # arms coincide at t=0


def test_arm_balance(base):
    per_site = (
        base.observations.drop_duplicates("patient_id").groupby("site")["arm"].agg(["sum", "size"])
    )
    assert (per_site["sum"] * 2 == per_site["size"]).all()
    odd = SiteProfile("odd", 21, 50.0, 0.5, 0.0, 1.0, 0.0, 0.1)
    arms = generate_cohort(CohortConfig(sites=(odd,))).observations.drop_duplicates("patient_id")[
        "arm"
    ]
    assert (arms == 1).sum() == 10 and (arms == 0).sum() == 11


def test_missingness(base):
    obs = base.observations
    assert obs.loc[obs["visit"] == 0, "y"].notna().all()
    for site_id, m in [("site-4", 0.20), ("site-5", 0.30)]:
        v1 = base.site(site_id).query("visit == 1")["y"].isna().mean()
        assert m - 0.06 <= v1 <= m + 0.10  # MCAR plus a little dropout after baseline
    # Without MCAR, observed visits form a prefix (dropout is absorbing).
    site = SiteProfile("mono", 300, 60.0, 0.5, 0.0, 1.0, 0.0, 0.0, dropout_slope=3.0)
    y = (
        generate_cohort(CohortConfig(sites=(site,)))
        .observations.pivot(index="patient_id", columns="visit", values="y")
        .notna()
        .to_numpy()
    )
    assert (np.diff(y.astype(int), axis=1) <= 0).all()
    assert 0 < (~y[:, -1]).sum() < len(y)


def test_true_ate(base):
    assert base.summary["pooled"]["true_ate"] == -2.4
    assert all(s["true_ate"] == -2.4 for s in base.summary["sites"].values())
    last = base.truth[base.truth["visit"] == 6]
    assert abs((last["z_treated"] - last["z_control"]).mean() + 2.4) < 1e-9
    json.dumps(base.summary)  # JSON-able
    # Heterogeneous effect: pooled truth uses E[x_sev] = sum n_s delta_s / N = 1265 / 1830.
    het = generate_cohort(CohortConfig(params=TrajectoryParams(rho=0.3)))
    expected = -2.4 * (1 + 0.3 * 1265 / 1830)
    assert het.summary["pooled"]["true_ate"] == pytest.approx(expected)
    last = het.truth[het.truth["visit"] == 6]
    assert (last["z_treated"] - last["z_control"]).mean() == pytest.approx(expected, abs=0.05)


def test_site_age_mean(base):
    ages = base.site("site-5").drop_duplicates("patient_id")["age"]
    assert abs(ages.mean() - 70.0) < 1.0


def test_site_lookup_error(base):
    with pytest.raises(KeyError, match="site-1"):
        base.site("site-9")


def test_covariate_drift_only_affects_target_site_after_day(base):
    drifted = _drifted("site-3:covariate_severity:200")
    for site_id in SITE_IDS:
        if site_id != "site-3":
            pd.testing.assert_frame_equal(drifted.site(site_id), base.site(site_id))
    old, new = base.site("site-3"), drifted.site("site-3")
    enrol = old.groupby("patient_id")["calendar_day"].transform("first")
    pd.testing.assert_frame_equal(old[enrol <= 200], new[enrol <= 200])
    assert not old[enrol > 200].equals(new[enrol > 200])
    rows = (base.truth["site"] == "site-3").to_numpy()
    sev_old = base.truth.loc[rows, "sev"].to_numpy()
    sev_new = drifted.truth.loc[rows, "sev"].to_numpy()
    post = (enrol > 200).to_numpy()
    assert np.allclose(sev_new[post] - sev_old[post], 1.5) and np.array_equal(
        sev_new[~post], sev_old[~post]
    )
    pd.testing.assert_frame_equal(drifted.truth[~rows], base.truth[~rows])
    assert drifted.summary["drift"] == [
        {"site": "site-3", "kind": "covariate_severity", "day": 200.0, "magnitude": 1.5}
    ]
    assert drifted.summary["pooled"]["true_ate"] == -2.4  # ground truth stays pre-drift


def test_concept_slope_drift_only_changes_y_after_day(base):
    drifted = _drifted("site-2:concept_slope:200:0.8")
    for site_id in SITE_IDS:
        if site_id != "site-2":
            pd.testing.assert_frame_equal(drifted.site(site_id), base.site(site_id))
    old, new = base.site("site-2"), drifted.site("site-2")
    pd.testing.assert_frame_equal(old.drop(columns="y"), new.drop(columns="y"))
    before = old["calendar_day"] <= 200
    pd.testing.assert_series_equal(old.loc[before, "y"], new.loc[before, "y"])
    assert not old.loc[~before, "y"].equals(new.loc[~before, "y"])
    # Latent change is continuous at d*: 0.8 * sev * (t - max(t*, 0)) after d*, 0 before.
    rows = (base.truth["site"] == "site-2").to_numpy()
    sev = base.truth.loc[rows, "sev"].to_numpy()
    t_star = np.maximum((200 - (old["calendar_day"] - 60 * old["t"])) / 60, 0).to_numpy()
    expected = 0.8 * sev * np.maximum(old["t"].to_numpy() - t_star, 0)
    diff = (
        drifted.truth.loc[rows, "z_control"].to_numpy()
        - base.truth.loc[rows, "z_control"].to_numpy()
    )
    assert np.allclose(diff, expected)


def test_concept_effect_drift_sets_post_change_tau(base):
    drifted = _drifted("site-4:concept_effect:100")
    t = drifted.truth
    obs = drifted.observations
    enrol = obs.groupby("patient_id")["calendar_day"].transform("first")
    last = (t["site"] == "site-4") & (t["visit"] == 6) & (enrol > 100)
    assert last.any()
    assert np.allclose(t.loc[last, "z_treated"], t.loc[last, "z_control"])  # tau_post = 0
    pd.testing.assert_frame_equal(
        drifted.site("site-4").query("calendar_day <= 100"),
        base.site("site-4").query("calendar_day <= 100"),
    )
    assert drifted.summary["sites"]["site-4"]["true_ate"] == -2.4


def test_write_cohort(tmp_path, base):
    drifted = _drifted("site-3:covariate_age:150:5")
    paths = write_cohort(drifted, tmp_path)
    assert set(paths) == set(SITE_IDS) | {"truth", "summary", "schema", "drift"}
    for site_id in SITE_IDS:
        assert paths[site_id] == tmp_path / "sites" / f"{site_id}.csv"
        back = pd.read_csv(paths[site_id])
        assert list(back.columns) == OBS_COLS and len(back) == len(drifted.site(site_id))
        assert np.allclose(back["y"], drifted.site(site_id)["y"], equal_nan=True)
    assert paths["truth"].parent == tmp_path / "truth" == paths["summary"].parent
    assert len(pd.read_csv(paths["truth"])) == len(drifted.truth)
    assert json.loads(paths["summary"].read_text())["seed"] == 7
    assert json.loads(paths["drift"].read_text()) == [
        {"site": "site-3", "kind": "covariate_age", "day": 150.0, "magnitude": 5.0}
    ]
    assert yaml.safe_load(paths["schema"].read_text()) == cohort_schema()
    write_cohort(base, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "drift.json").read_text()) == []


def test_schema_shape():
    schema = cohort_schema()
    assert (
        schema["target"] == "y" and schema["horizon"] == 6 and schema["id_column"] == "patient_id"
    )
    assert [f["name"] for f in schema["features"]] == ["age", "sex", "bmi"]
    assert cohort_schema(TrajectoryParams(horizon=4))["horizon"] == 4


def test_drift_spec_parse():
    spec = DriftSpec.parse("site-3:covariate_severity:200")
    assert (spec.site_id, spec.kind, spec.day, spec.magnitude) == (
        "site-3",
        "covariate_severity",
        200.0,
        1.5,
    )
    assert DriftSpec.parse("site-3:concept_slope:200:0.8").magnitude == 0.8
    assert DriftSpec.parse("site-1:covariate_age:0").magnitude == 10.0
    assert DriftSpec.parse("site-1:concept_slope:0").magnitude == 0.5
    assert DriftSpec.parse("site-1:concept_effect:0").magnitude == 0.0
    for bad, msg in [
        ("site-3:covariate_severity", "expected 'site:kind:day"),
        ("", "expected 'site:kind:day"),
        ("site-3:concept_slope:200:0.8:9", "expected 'site:kind:day"),
        ("site-3:bogus:200", "unknown drift kind"),
        ("site-3:concept_slope:soon", "must be numbers"),
        ("site-3:concept_slope:200:big", "must be numbers"),
    ]:
        with pytest.raises(ValueError, match=msg):
            DriftSpec.parse(bad)
    with pytest.raises(ValueError, match="unknown site"):
        generate_cohort(CohortConfig(drift=(DriftSpec.parse("site-9:concept_slope:10"),)))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 25), m=st.floats(0.0, 0.9))
def test_invariants_hold_for_any_seed(seed, n, m):
    site = SiteProfile("s", n, 50.0, 0.5, 0.0, 1.0, 0.0, m)
    obs = generate_cohort(CohortConfig(seed=seed, sites=(site,))).observations
    arms = obs.drop_duplicates("patient_id")["arm"]
    assert len(obs) == 7 * n and arms.sum() == n // 2
    assert obs.loc[obs["visit"] == 0, "y"].notna().all()
