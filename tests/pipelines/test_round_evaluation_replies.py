"""round_evaluation asks the sites first and checks their replies once the task is resolved;
the champion is read from MLflow meanwhile. What a round records must not depend on that order:
malformed replies are failures of their sites, and a registry that cannot be read fails the
step only after the evaluation is recorded (so re-execution from failure loses nothing)."""

from __future__ import annotations

import math

import dagster as dg
import pytest

from tests.conftest import SITES
from tests.pipelines.hostile_sites import Tampered
from twin_core.federation import SiteEvaluation, SiteFailure
from twin_pipelines.assets.evaluation import _screened
from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.resources import InProcessFleet, MlflowRegistry


def _undeclared_statistic(statistics: dict) -> dict:
    return {**statistics, "patient_ids": 1.0}


def _nan_statistic(statistics: dict) -> dict:
    return {**statistics, next(iter(statistics)): math.nan}


@pytest.fixture(scope="module")
def handlers(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in SITES}


class _Task:
    statistic_names = ("n", "sse")


def test_screened_turns_malformed_replies_into_failures_and_keeps_the_rest():
    good = SiteEvaluation("site-1", "r0001", 10, {"n": 10.0, "sse": 2.0}, 0.1)
    extra = SiteEvaluation("site-2", "r0001", 10, {"n": 10.0, "sse": 2.0, "x": 1.0}, 0.1)
    nan = SiteEvaluation("site-3", "r0001", 10, {"n": 10.0, "sse": math.nan}, 0.1)
    down = SiteFailure("site-4", "evaluate", "UNAVAILABLE", "connection refused")
    out = _screened(_Task(), {"site-1": good, "site-2": extra, "site-3": nan, "site-4": down})
    assert list(out) == ["site-1", "site-2", "site-3", "site-4"]
    assert out["site-1"] is good and out["site-4"] is down
    for site in ("site-2", "site-3"):
        assert isinstance(out[site], SiteFailure)
        assert (out[site].site_id, out[site].stage, out[site].code) == (
            site,
            "evaluate",
            "MALFORMED_REPLY",
        )
    assert "not the task's" in out["site-2"].reason
    assert "non-finite" in out["site-3"].reason


def test_malformed_evaluations_are_site_failures_of_the_round(handlers, round_env, instance):
    fleet = {
        **handlers,
        "site-3": Tampered(handlers["site-3"], evaluation=_undeclared_statistic),
        "site-4": Tampered(handlers["site-4"], evaluation=_nan_statistic),
    }
    env = round_env(InProcessFleet(fleet))
    result = run_round(env.defs, instance, RoundConfig(min_sites=2))
    assert result.success, result.error
    doc = env.store.read_json(result.round_key, "evaluation.json")
    assert sorted(doc["per_site"]) == ["site-1", "site-2"]
    failed = {f["site_id"]: f["code"] for f in doc["failures"]}
    assert failed == {"site-3": "MALFORMED_REPLY", "site-4": "MALFORMED_REPLY"}


def test_unreadable_registry_fails_the_step_after_the_evaluation_is_recorded(
    handlers, round_env, instance, monkeypatch
):
    def unreachable(self):
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(MlflowRegistry, "champion", unreachable)
    env = round_env(InProcessFleet(handlers))
    result = run_round(env.defs, instance, RoundConfig(min_sites=2))
    assert not result.success
    assert "registry unreachable" in result.error
    failed = {
        e.step_key
        for e in instance.all_logs(result.run_id)
        if e.is_dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_FAILURE
    }
    assert failed == {"round_evaluation"}
    doc = env.store.read_json(result.round_key, "evaluation.json")
    assert sorted(doc["per_site"]) == list(SITES)
