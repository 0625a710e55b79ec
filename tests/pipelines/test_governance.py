"""Governed promotion in the MLflow registry: the policy, the reviewer, and the tags they leave.
A rejected or failed candidate never becomes champion."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SITES
from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.experiments import SignFlipSite
from twin_pipelines.resources import InProcessFleet


@pytest.fixture(scope="module")
def handlers(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in SITES}


def _review(env, instance, version: str, decision: str, reviewer: str = "dr.ada", note: str = ""):
    return env.defs.resolve_job_def("review_job").execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={
            "ops": {
                "review_model_version": {
                    "config": {
                        "version": version,
                        "decision": decision,
                        "reviewer": reviewer,
                        "note": note,
                    }
                }
            }
        },
    )


def _version(env, version: str):
    return next(v for v in env.versions() if str(v.version) == version)


def _failure(result) -> str:
    event = next(e for e in result.all_events if e.is_step_failure)
    error = event.step_failure_data.error
    return (error.cause or error).message


def test_manual_review_rejects_and_approves(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    manual = RoundConfig(min_sites=3, promotion="manual")

    first = run_round(env.defs, instance, manual)
    assert first.success, first.error
    v1 = _version(env, "1")
    assert v1.tags["governance.status"] == "pending_review"
    assert v1.tags["governance.policy"] == "promote"  # the policy recommends, a human decides
    assert env.alias("champion") is None and env.alias("challenger") == "1"
    assert "pending a reviewer's decision" in v1.description
    assert "## Data checks and drift at each site" in v1.description

    rejected = _review(env, instance, "1", "reject", note="calibration not checked yet")
    assert rejected.success
    v1 = _version(env, "1")
    assert v1.tags["governance.status"] == "rejected"
    assert (v1.tags["governance.reviewer"], v1.tags["governance.note"]) == (
        "dr.ada",
        "calibration not checked yet",
    )
    assert env.alias("champion") is None  # rejected: never champion

    again = _review(env, instance, "1", "approve")
    assert not again.success and "version 1 is rejected, not pending review" in _failure(again)
    assert env.alias("champion") is None

    second = run_round(env.defs, instance, manual)
    assert second.success, second.error
    nobody = _review(env, instance, "2", "approve", reviewer=" ")
    assert not nobody.success and "reviewer must be named" in _failure(nobody)
    approved = _review(env, instance, "2", "approve", note="checked")
    assert approved.success
    v2 = _version(env, "2")
    assert v2.tags["governance.status"] == "approved" and v2.tags["governance.reviewer"] == "dr.ada"
    assert env.alias("champion") == "2"


def test_automatic_policy_records_its_verdict(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    first = run_round(env.defs, instance, RoundConfig(min_sites=3))
    assert first.success
    v1 = _version(env, "1")
    assert v1.tags["governance.status"] == "approved"
    assert v1.tags["governance.reviewer"] == "policy:automatic"
    assert v1.tags["governance.reasons"] == "no champion yet"
    assert env.alias("champion") == "1"
    # a candidate that passes the gates (a lenient regression tolerance) but is worse than the
    # champion: registered as challenger, the champion stays, the reasons say why
    # (one site sends its change reversed and tripled; FedAvg takes it in)
    flipped = dict(handlers, **{SITES[-1]: SignFlipSite(handlers[SITES[-1]], scale=-3.0)})
    same_registry = round_env(InProcessFleet(flipped))
    worse = RoundConfig(min_sites=3, regression_tolerance=1e9, max_update_norm=1e9)
    second = run_round(same_registry.defs, instance, worse)
    assert second.success, second.error
    assert second.pooled["loss"] > first.pooled["loss"]
    v2 = _version(env, "2")
    assert v2.tags["governance.policy"] == "keep_champion"
    assert v2.tags["governance.status"] == "not_promoted"
    assert "does not beat the champion" in v2.tags["governance.reasons"]
    assert env.alias("champion") == "1" and env.alias("challenger") == "2"
    assert env.store.latest_passed()["round"] == second.round_key  # the next round starts here


def test_site_metrics_keep_headlines_and_the_first_visit_ahead():
    from twin_pipelines.assets.registry import site_metrics

    per_site = {
        "a": {"loss": 1.0, "mae_h1": 2.0, "mae_h2": 3.0, "coverage90_h12": 4.0, "rmse": 5.0},
        "b": {"loss": 6.0, "baseline_mae_h1": 7.0, "trajectory_z": 8.0, "rmse_h9": 9.0},
    }
    assert site_metrics(per_site) == {
        "site/a/loss": 1.0,
        "site/a/mae_h1": 2.0,
        "site/a/rmse": 5.0,
        "site/b/loss": 6.0,
        "site/b/baseline_mae_h1": 7.0,
        "site/b/trajectory_z": 8.0,
    }


def test_registration_does_not_scan_the_installed_packages(
    handlers, round_env, instance, monkeypatch
):
    """MLflow's requirement check scans every installed distribution (0.3 s in each launched
    run's fresh process) to warn about pins the orchestrator's own environment satisfies."""
    from mlflow import MlflowClient
    from mlflow.utils import requirements_utils

    checked = []
    real = requirements_utils._check_requirement_satisfied
    monkeypatch.setattr(
        requirements_utils,
        "_check_requirement_satisfied",
        lambda requirement: checked.append(requirement) or real(requirement),
    )
    env = round_env(InProcessFleet(handlers))
    result = run_round(env.defs, instance, RoundConfig(min_sites=3))
    assert result.success, result.error
    assert checked == []
    version = env.versions()[-1]
    client = MlflowClient(tracking_uri=env.registry.tracking_uri)
    requirements = client.download_artifacts(version.run_id, "model/requirements.txt")
    assert "torch==2.13.0" in Path(requirements).read_text()
