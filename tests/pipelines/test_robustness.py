"""Expected outcomes on the default cohort (small configuration): with one poisoned site,
robust strategies stay near the clean run while FedAvg does not."""

from __future__ import annotations

import pytest

from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.experiments import SignFlipSite
from twin_pipelines.resources import InProcessFleet

FIVE = ("site-1", "site-2", "site-3", "site-4", "site-5")


@pytest.fixture(scope="module")
def handlers(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in FIVE}


def _loss(round_env, instance, fleet, name: str, **settings) -> float:
    env = round_env(InProcessFleet(fleet), name_suffix=name)
    result = run_round(
        env.defs,
        instance,
        RoundConfig(min_sites=3, max_update_norm=1e9, **settings),
        round_key=f"r-{name}",
    )
    assert result.success, result.error
    return result.pooled["loss"]


def test_robust_strategies_resist_a_poisoned_site(handlers, round_env, instance, tmp_path):
    poisoned = {**handlers, "site-4": SignFlipSite(handlers["site-4"])}
    clean = _loss(round_env, instance, handlers, "clean")
    fedavg = _loss(round_env, instance, poisoned, "fedavg")
    robust = {
        "median": _loss(round_env, instance, poisoned, "median", strategy="median"),
        "trimmed": _loss(
            round_env, instance, poisoned, "trimmed", strategy="trimmed_mean", trim_fraction=0.2
        ),
        "krum": _loss(
            round_env, instance, poisoned, "krum", strategy="multi_krum", krum_f=1, krum_m=2
        ),
        "screened": _loss(round_env, instance, poisoned, "screened", screen_updates=True),
    }
    assert fedavg > 1.10 * clean, (clean, fedavg)
    for name, loss in robust.items():
        assert abs(loss - clean) <= 0.10 * abs(clean), (name, clean, loss)
