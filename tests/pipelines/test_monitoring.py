"""Data checks and drift at the sites, through Dagster: selection skips failing sites, and the
drift sensor starts a retraining campaign for the site that drifted, only after it drifted."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from site_worker.handler import SiteHandler
from twin_core.cohort import CohortConfig, DriftSpec, cohort_schema, generate_cohort
from twin_core.schema import check_frame, parse_schema
from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.jobs import fl_campaign_job
from twin_pipelines.resources import DriftPolicy, InProcessFleet
from twin_pipelines.sensors import drift_sensor

SCHEMA = parse_schema(cohort_schema())
SITES = ("site-3", "site-4", "site-5")
DRIFT_DAY = 180.0


def enrolled_until(frame: pd.DataFrame, day: float) -> pd.DataFrame:
    """The site's data as it stood on `day`: the patients enrolled by then."""
    start = frame[frame["visit"] == 0].set_index("patient_id")["calendar_day"]
    return frame[frame["patient_id"].isin(start[start <= day].index)]


class GrowingExtract:
    """A hospital's extract that grows over time (the worker re-reads it when it changes)."""

    def __init__(self, frame: pd.DataFrame, day: float) -> None:
        self.full, self.day = frame, day

    def version(self) -> float:
        return self.day

    def load(self):
        return SCHEMA, check_frame(SCHEMA, enrolled_until(self.full, self.day))


@pytest.fixture
def drifting_sites():
    cohort = generate_cohort(
        CohortConfig(seed=7, drift=(DriftSpec("site-5", "covariate_severity", DRIFT_DAY),))
    )
    sources = {s: GrowingExtract(cohort.site(s), 150.0) for s in SITES}
    handlers = {
        s: SiteHandler.from_source(s, src, drift_window_days=120.0) for s, src in sources.items()
    }
    return handlers, sources


def _materialize_monitoring(env, instance):
    result = env.defs.resolve_job_def("monitoring_job").execute_in_process(instance=instance)
    assert result.success
    return result


def _sense(instance, cursor=None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"drift_policy": DriftPolicy()}
    )
    return drift_sensor(context), context.cursor


def test_drift_sensor_fires_for_the_drifted_site_only_after_the_drift(
    drifting_sites, round_env, instance
):
    handlers, sources = drifting_sites
    env = round_env(InProcessFleet(handlers))
    trained = run_round(env.defs, instance, RoundConfig(min_sites=3))
    assert trained.success, trained.error

    # no new data, nothing to compare: no campaign
    _materialize_monitoring(env, instance)
    result, cursor = _sense(instance)
    assert isinstance(result, dg.SkipReason)

    # more patients, all enrolled before the drift: still no campaign
    for source in sources.values():
        source.day = 175.0
    _materialize_monitoring(env, instance)
    result, cursor = _sense(instance, cursor)
    assert isinstance(result, dg.SkipReason), result

    # the same sensor tick again, with no new monitoring result: nothing to do
    again, _ = _sense(instance, cursor)
    assert isinstance(again, dg.SkipReason) and "no new monitoring" in again.skip_message

    # a year in: site-5's new patients are sicker (covariate shift after day 180)
    for source in sources.values():
        source.day = 365.0
    monitoring = _materialize_monitoring(env, instance)
    request, cursor = _sense(instance, cursor)
    assert isinstance(request, dg.RunRequest), request
    assert request.tags["twin/trigger"] == "drift"
    assert request.tags["twin/drift_sites"] == "site-5"
    scores = json.loads(request.tags["twin/drift_scores"])
    assert scores["site-5/data_drift"] >= 0.5
    # severity is latent: sicker patients' courses are steeper than their covariates tell,
    # so the champion may also do worse there; only ever at site-5
    assert set(scores) <= {"site-5/data_drift", "site-5/performance_drift"}, scores
    assert request.run_key.startswith(f"drift:site-5/data_drift/{trained.round_key}")

    drift_event = monitoring.asset_materializations_for_node("site_drift")[0]
    table = {r.data["site"]: r.data for r in drift_event.metadata["sites"].records}
    assert table["site-5"]["dataset_drift"] and "y" in table["site-5"]["drifted"]
    assert not table["site-3"]["dataset_drift"] and not table["site-4"]["dataset_drift"]

    # seen again before retraining: the same run key, so the daemon starts no second campaign
    _materialize_monitoring(env, instance)
    repeat, _ = _sense(instance, cursor)
    assert isinstance(repeat, dg.RunRequest) and repeat.run_key == request.run_key

    # the requested run, to completion: a campaign start with the drift tags
    run = fl_campaign_job.execute_in_process(
        instance=instance, run_config=request.run_config, tags=request.tags
    )
    assert run.success
    assert instance.get_run_by_id(run.run_id).tags["twin/drift_sites"] == "site-5"


def test_no_drift_no_campaign(round_env, instance):
    cohort = generate_cohort(CohortConfig(seed=7))
    sources = {s: GrowingExtract(cohort.site(s), 150.0) for s in SITES}
    handlers = {
        s: SiteHandler.from_source(s, src, drift_window_days=120.0) for s, src in sources.items()
    }
    env = round_env(InProcessFleet(handlers))
    assert run_round(env.defs, instance, RoundConfig(min_sites=3)).success
    for source in sources.values():
        source.day = 365.0
    _materialize_monitoring(env, instance)
    result, _ = _sense(instance)
    assert isinstance(result, dg.SkipReason) and "no site crossed" in result.skip_message


def test_a_site_failing_its_data_check_is_skipped_and_reported(make_handler, round_env, instance):
    handlers = {s: make_handler(s) for s in ("site-1", "site-2", "site-3")}
    bad = handlers["site-2"].frame.copy()
    bad.loc[bad.index[:40], "age"] = 150.0  # out of the declared range [18, 90]
    handlers["site-2"] = SiteHandler("site-2", SCHEMA, bad)
    env = round_env(InProcessFleet(handlers))

    quality = env.defs.resolve_job_def("monitoring_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("site_data_quality")]
    )
    event = quality.asset_materializations_for_node("site_data_quality")[0]
    rows = {r.data["site"]: r.data for r in event.metadata["sites"].records}
    assert (
        not rows["site-2"]["passed"]
        and "expect_column_values_to_be_between(age)" in rows["site-2"]["failed"]
    )
    assert rows["site-1"]["passed"] and rows["site-3"]["passed"]
    assert event.metadata["sites_failing"].value == 1

    result = run_round(env.defs, instance, RoundConfig(min_sites=2))
    assert result.success, result.error
    assert result.sites == ("site-1", "site-3")
    plan = env.store.read_json(result.round_key, "plan.json")
    decision = next(d for d in plan["selection"]["decisions"] if d["site_id"] == "site-2")
    assert not decision["chosen"] and decision["reason"].startswith("data check failed")
    assert "of rows" in decision["reason"]


class ReplacedExtract:
    """A hospital's extract that is replaced wholesale (a new export of the same patients)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame, self.edition = frame, 1

    def replace_with(self, frame: pd.DataFrame) -> None:
        self.frame, self.edition = frame, self.edition + 1

    def version(self) -> int:
        return self.edition

    def load(self):
        return SCHEMA, check_frame(SCHEMA, self.frame)


def test_a_concept_shift_is_caught_by_the_performance_check(round_env, instance):
    """The disease course changes at site-5 (slope of severity, twin-model.md concept shift):
    the inputs look the same, so data drift stays quiet, but the champion's trajectory
    forecasts there get worse than at registration, and the sensor asks for retraining."""
    before = generate_cohort(CohortConfig(seed=7))
    after = generate_cohort(
        CohortConfig(seed=7, drift=(DriftSpec("site-5", "concept_slope", 0.0),))
    )
    sources = {s: ReplacedExtract(before.site(s)) for s in SITES}
    handlers = {s: SiteHandler.from_source(s, src) for s, src in sources.items()}
    env = round_env(InProcessFleet(handlers))
    assert run_round(env.defs, instance, RoundConfig(min_sites=3)).success
    assert env.alias("champion") == "1"

    _materialize_monitoring(env, instance)
    result, cursor = _sense(instance)
    assert isinstance(result, dg.SkipReason)  # same data, same performance

    sources["site-5"].replace_with(after.site("site-5"))
    monitoring = _materialize_monitoring(env, instance)
    perf = monitoring.asset_materializations_for_node("champion_performance")[0].metadata
    assert perf["metric"].value == "trajectory_z"
    change = {r.data["site"]: r.data["change"] for r in perf["sites"].records}
    assert change["site-5"] > 0.10 and change["site-3"] == change["site-4"] == 0.0
    drift = monitoring.asset_materializations_for_node("site_drift")[0].metadata
    assert drift["sites_drifting"].value == 0  # the inputs did not move

    request, _ = _sense(instance, cursor)
    assert isinstance(request, dg.RunRequest), request
    assert request.tags["twin/drift_sites"] == "site-5"
    assert request.run_key == "drift:site-5/performance_drift/v1"
