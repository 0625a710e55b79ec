"""Rounds through Dagster over in-process sites: the fast path, same assets as production."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from tests.conftest import SITES
from tests.pipelines.hostile_sites import Tampered
from twin_pipelines.campaign import run_campaign, run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.resources import InProcessFleet


def _nan_tensor(weights: dict) -> dict:
    name = next(iter(weights))
    return {**weights, name: np.full_like(weights[name], np.nan)}


def _wrong_shape(weights: dict) -> dict:
    name = next(iter(weights))
    shape = weights[name].shape
    return {**weights, name: np.zeros(shape[:-1] + (shape[-1] + 1,), weights[name].dtype)}


@pytest.fixture(scope="module")
def handlers(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in SITES}


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_two_rounds_register_versions_and_improve(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    results = run_campaign(env.defs, instance, 2, RoundConfig(min_sites=3))
    assert [r.success for r in results] == [True, True], [r.error for r in results]
    assert results[1].pooled["loss"] < results[0].pooled["loss"]
    assert [str(v.version) for v in env.versions()] == ["1", "2"]
    assert env.alias("challenger") == "2" and env.alias("champion") == "2"
    latest = env.store.latest_passed()
    assert latest["round"] == results[1].round_key
    # round 2 started from round 1's candidate, not from a fresh initialisation
    plan = env.store.read_json(results[1].round_key, "plan.json")
    assert plan["start_round"] == results[0].round_key


def test_same_seed_gives_bit_identical_global_weights(handlers, round_env, tmp_path):
    digests = []
    for attempt in ("a", "b"):
        env = round_env(
            InProcessFleet(handlers), store_root=tmp_path / attempt, name_suffix=attempt
        )
        with dg.instance_for_test() as inst:
            results = run_campaign(env.defs, inst, 2, RoundConfig(min_sites=4, seed=11))
        assert all(r.success for r in results)
        digests.append([_sha(env.store.round_dir(r.round_key) / "candidate.twt") for r in results])
    assert digests[0] == digests[1]
    # and a different seed gives a different model
    env = round_env(InProcessFleet(handlers), store_root=tmp_path / "c", name_suffix="c")
    with dg.instance_for_test() as inst:
        other = run_round(env.defs, inst, RoundConfig(min_sites=4, seed=12))
    assert _sha(env.store.round_dir(other.round_key) / "candidate.twt") != digests[0][0]


def test_corrupt_updates_are_rejected_and_reported(handlers, round_env, instance):
    fleet = {
        **handlers,
        "site-3": Tampered(handlers["site-3"], update=_nan_tensor),
        "site-4": Tampered(handlers["site-4"], update=_wrong_shape),
    }
    env = round_env(InProcessFleet(fleet))
    result = run_round(env.defs, instance, RoundConfig(min_sites=2))
    assert result.success, result.error
    assert result.sites == ("site-1", "site-2")
    assert result.failed_sites == ("site-3", "site-4")
    round_dir = env.store.round_dir(result.round_key)
    # rejected updates are kept for forensics, never aggregated
    assert sorted(p.name for p in (round_dir / "rejected").iterdir()) == [
        "site-3.twt",
        "site-4.twt",
    ]
    assert sorted(p.name for p in (round_dir / "updates").iterdir()) == ["site-1.twt", "site-2.twt"]
    check = next(
        e
        for e in instance.get_latest_materialization_event(
            dg.AssetKey("site_updates")
        ).asset_materialization.metadata.items()
        if e[0] == "sites"
    )[1]
    statuses = {r.data["site"]: r.data["status"] for r in check.records}
    assert statuses["site-3"].startswith("INVALID_UPDATE") and "non-finite" in statuses["site-3"]
    assert statuses["site-4"].startswith("INVALID_UPDATE") and "shape" in statuses["site-4"]


def test_quorum_failure_registers_nothing_and_keeps_updates(handlers, round_env, instance):
    fleet = {
        **handlers,
        "site-3": Tampered(handlers["site-3"], update=_nan_tensor),
        "site-4": Tampered(handlers["site-4"], update=_nan_tensor),
    }
    env = round_env(InProcessFleet(fleet))
    result = run_round(env.defs, instance, RoundConfig(min_sites=3))
    assert not result.success
    assert "quorum_met" in result.error or "blocking" in result.error.lower()
    assert env.versions() == []
    assert env.store.latest_passed() is None
    updates = sorted(p.name for p in (env.store.round_dir(result.round_key) / "updates").iterdir())
    assert updates == ["site-1.twt", "site-2.twt"]  # what succeeded is persisted, not lost
    evaluation = instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(dg.AssetKey("site_updates"), "quorum_met")
    )
    assert evaluation is not None and not evaluation.evaluation.passed
    assert "2 site(s) returned a valid update; quorum is 3" in evaluation.evaluation.description


def test_regression_gate_blocks_a_worse_candidate(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    first = run_round(env.defs, instance, RoundConfig(min_sites=2))
    assert first.success
    wild = RoundConfig(
        min_sites=2, optimizer="sgd", learning_rate=5.0, local_epochs=3, max_update_norm=1e9
    )
    second = run_round(env.defs, instance, wild)
    assert not second.success
    assert "no_pooled_regression" in second.error or "blocking" in second.error.lower()
    assert [str(v.version) for v in env.versions()] == ["1"]
    assert env.store.latest_passed()["round"] == first.round_key  # start point untouched


def test_invalid_round_config_fails_with_clear_message(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    result = run_round(env.defs, instance, RoundConfig(min_sites=0, strategy="fedmagic"))
    assert not result.success
    assert (
        "min_sites must be >= 1" in result.error and "unknown strategy 'fedmagic'" in result.error
    )
