"""Each strategy through the round assets, chosen by name in the round config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SITES
from twin_core.weights import delta_norm, load_weights
from twin_pipelines.campaign import run_campaign, run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.resources import InProcessFleet


@pytest.fixture(scope="module")
def handlers(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in SITES}


@pytest.mark.parametrize(
    "settings",
    [
        {"strategy": "fedavg_uniform"},
        {"strategy": "median"},
        {"strategy": "trimmed_mean", "trim_fraction": 0.25},
        {"strategy": "multi_krum", "krum_f": 0, "krum_m": 2},
        {"strategy": "fedyogi", "server_lr": 0.01},
    ],
    ids=lambda s: s["strategy"],
)
def test_a_round_runs_with_each_strategy(handlers, round_env, instance, settings):
    env = round_env(InProcessFleet(handlers))
    result = run_round(env.defs, instance, RoundConfig(min_sites=4, **settings))
    assert result.success, result.error
    version = env.versions()[0]
    assert version.tags["twin.strategy"] == settings["strategy"]
    params = json.loads(version.tags["twin.strategy_params"])
    for key in set(settings) - {"strategy"}:
        assert params[key] == settings[key]
    assert json.loads(version.tags["twin.selection"])["policy"] == "all"


def test_server_optimiser_state_carries_over_between_rounds(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    results = run_campaign(env.defs, instance, 2, RoundConfig(min_sites=4, strategy="fedadam"))
    assert all(r.success for r in results), [r.error for r in results]
    states = [load_weights(env.store.round_dir(r.round_key) / "server_state.twt") for r in results]
    assert [s.meta["step"] for s in states] == [1, 2]
    assert states[1].meta["optimizer"] == "fedadam"


def _mean_update_distance(env, round_key: str) -> float:
    round_dir = env.store.round_dir(round_key)
    start = load_weights(round_dir / "start.twt").weights
    norms = [
        delta_norm(load_weights(p).weights, start)
        for p in sorted((round_dir / "updates").iterdir())
    ]
    return float(np.mean(norms))


def test_fedprox_keeps_local_models_near_the_global_one(handlers, round_env, instance, tmp_path):
    plain = round_env(InProcessFleet(handlers), store_root=tmp_path / "plain", name_suffix="p")
    prox = round_env(InProcessFleet(handlers), store_root=tmp_path / "prox", name_suffix="x")
    a = run_round(plain.defs, instance, RoundConfig(min_sites=4, local_epochs=4), round_key="r0001")
    b = run_round(
        prox.defs,
        instance,
        RoundConfig(min_sites=4, local_epochs=4, proximal_mu=1.0),
        round_key="r0002",
    )
    assert a.success and b.success
    assert _mean_update_distance(prox, b.round_key) < 0.8 * _mean_update_distance(
        plain, a.round_key
    )


def test_fairness_rotates_sites_across_rounds(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    config = RoundConfig(min_sites=2, selection="fairness", fraction=0.5)
    results = run_campaign(env.defs, instance, 2, config)
    assert all(r.success for r in results), [r.error for r in results]
    first, second = (set(r.sites) for r in results)
    assert len(first) == len(second) == 2 and not first & second  # the others' turn
    plan = env.store.read_json(results[1].round_key, "plan.json")
    reasons = {d["site_id"]: d["reason"] for d in plan["selection"]["decisions"]}
    assert all("policy fairness" in r for r in reasons.values())


def test_scaffold_rounds_keep_control_variates_on_both_sides(handlers, round_env, instance):
    env = round_env(InProcessFleet(handlers))
    config = RoundConfig(min_sites=4, strategy="scaffold", optimizer="sgd", learning_rate=0.05)
    results = run_campaign(env.defs, instance, 2, config)
    assert all(r.success for r in results), [r.error for r in results]
    server = load_weights(env.store.round_dir(results[1].round_key) / "server_state.twt")
    assert server.meta == {"step": 2, "optimizer": "scaffold"}
    assert any(np.abs(v).max() > 0 for v in server.weights.values())  # c moved
    assert all(h._control is not None for h in handlers.values())  # each site keeps its c_i
    refused = run_round(env.defs, instance, RoundConfig(min_sites=4, strategy="scaffold"))
    assert not refused.success and "scaffold needs optimizer sgd" in refused.error
