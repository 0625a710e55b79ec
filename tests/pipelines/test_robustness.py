"""Expected outcomes on the default cohort (small configuration): with one poisoned site,
multi-Krum and update screening stay near the clean run while FedAvg does not; the
coordinate-wise rules stay far from FedAvg's ruin."""

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


def _loss(round_env, instance, fleet, name: str, rounds: int = 3, **settings) -> float:
    """Pooled loss after `rounds` rounds (the attack compounds: each round starts from the
    last candidate)."""
    env = round_env(InProcessFleet(fleet), name_suffix=name)
    config = RoundConfig(min_sites=3, max_update_norm=1e9, regression_tolerance=1e9, **settings)
    for index in range(1, rounds + 1):
        result = run_round(env.defs, instance, config, round_key=f"r-{name}-{index}")
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
    # three rounds: FedAvg's model is wrecked, the attack compounding from round to round
    assert fedavg > 2.0 * clean, (clean, fedavg)
    # update screening drops the attacker, multi-Krum picks the two most central updates
    for name in ("krum", "screened"):
        assert abs(robust[name] - clean) <= 0.10 * abs(clean), (name, clean, robust[name])
    # coordinate-wise rules keep each coordinate within the honest sites' range, but on five
    # very unequal sites they mix coordinates of different sites' models and the bias
    # compounds (here trimmed mean +19 %, median much worse; docs/experiments/poisoned.md
    # shows both near the clean run over 8 rounds with 3 local epochs): far from FedAvg's ruin
    for name in ("trimmed", "median"):
        assert robust[name] < 0.01 * fedavg, (name, robust[name], fedavg)
