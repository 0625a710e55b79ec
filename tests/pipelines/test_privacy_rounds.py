"""Secure aggregation and differential privacy through the real round job, over in-process
sites (the gRPC path is covered by tests/pipelines/test_integration.py and the wire audit)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from tests.conftest import SITES
from twin_core.weights import load_weights
from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.resources import InProcessFleet


@pytest.fixture(scope="module")
def handlers(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in SITES}


class DiesAfterSharing:
    """A site that advertises and shares its keys, then dies before sending its update."""

    def __init__(self, inner):
        self.inner, self.site_id = inner, inner.site_id

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, *args, **kwargs):
        from twin_core.errors import SiteCallError

        raise SiteCallError(self.site_id, "UNAVAILABLE", "the worker died while training")


class DiesAfterMasking(DiesAfterSharing):
    """A site that sends its masked update, then dies before unmasking."""

    def train(self, *args, **kwargs):
        return self.inner.train(*args, **kwargs)

    def secagg_unmask(self, *args, **kwargs):
        from twin_core.errors import SiteCallError

        raise SiteCallError(self.site_id, "UNAVAILABLE", "the worker died before unmasking")


def _candidate(env, result) -> dict[str, np.ndarray]:
    return load_weights(env.store.round_dir(result.round_key) / "candidate.twt").weights


def _round(env, config, key="r0001"):
    with dg.instance_for_test() as inst:
        return run_round(env.defs, inst, config, round_key=key)


def _close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst <= atol, worst


def test_secure_aggregation_gives_the_fedavg_model_and_keeps_only_masked_updates(
    handlers, round_env, tmp_path
):
    config = RoundConfig(min_sites=3, seed=5)
    plain_env = round_env(InProcessFleet(handlers), tmp_path / "plain", "plain")
    plain = _round(plain_env, config)
    secure_env = round_env(InProcessFleet(handlers), tmp_path / "secure", "secure")
    secure = _round(secure_env, config.model_copy(update={"secure_aggregation": True}))
    assert plain.success and secure.success, secure.error
    # FedAvg of float32 updates vs the fixed-point sum (2^-24 per value, weighted by examples)
    _close(_candidate(secure_env, secure), _candidate(plain_env, plain), atol=1e-5)
    # what the orchestrator kept of each site: one uint64 vector, nothing like the update
    stored = sorted((secure_env.store.round_dir(secure.round_key) / "updates").glob("*.twt"))
    assert [p.stem for p in stored] == sorted(SITES)
    for path in stored:
        weights = load_weights(path).weights
        assert list(weights) == ["secagg.masked"] and weights["secagg.masked"].dtype == np.uint64
        plain_update = load_weights(
            plain_env.store.round_dir(plain.round_key) / "updates" / path.name
        ).weights
        masked = weights["secagg.masked"].astype(np.float64) / 2.0**64
        first = np.concatenate(
            [v.ravel() for k, v in sorted(plain_update.items()) if v.dtype.kind == "f"]
        )
        assert abs(np.corrcoef(masked, first)[0, 1]) < 0.1


@pytest.mark.parametrize("failure", [DiesAfterSharing, DiesAfterMasking])
def test_a_site_dying_mid_protocol_still_gives_the_right_sum(
    failure, handlers, round_env, tmp_path
):
    dead = SITES[0]
    sites = {s: (failure(h) if s == dead else h) for s, h in handlers.items()}
    config = RoundConfig(min_sites=3, seed=6, secure_aggregation=True)
    env = round_env(InProcessFleet(sites), tmp_path / "secure", "secure")
    result = _round(env, config)
    assert result.success, result.error
    # the same fleet without secure aggregation: a site dead in training is left out there
    # too (so secure aggregation must have removed the others' pair masks with it); one dead
    # only at unmasking counts (its self mask rebuilt from the others' shares)
    plain_env = round_env(InProcessFleet(sites), tmp_path / "plain", "plain")
    plain = _round(plain_env, config.model_copy(update={"secure_aggregation": False}))
    _close(_candidate(env, result), _candidate(plain_env, plain), atol=1e-5)


def test_below_the_threshold_the_round_fails_clearly(handlers, round_env, tmp_path):
    sites = {
        s: (DiesAfterSharing(h) if i < 3 else h)
        for i, (s, h) in enumerate(sorted(handlers.items()))
    }
    env = round_env(InProcessFleet(sites), tmp_path / "secure")
    result = _round(env, RoundConfig(min_sites=2, secure_aggregation=True))
    assert not result.success
    assert "secure aggregation failed" in result.error
    assert "below the secure-aggregation threshold" in result.error


@pytest.mark.parametrize(
    "strategy", ["median", "trimmed_mean", "krum", "fedavg_quality", "scaffold"]
)
def test_strategies_that_need_each_update_are_refused_under_secure_aggregation(strategy):
    config = RoundConfig(strategy=strategy, secure_aggregation=True, optimizer="sgd")
    problems = " ".join(config.problems())
    assert (
        f"strategy {strategy} cannot run here: secure aggregation hides each site's update"
        in problems
    )
    assert "screen_updates needs each site's update" in " ".join(
        RoundConfig(secure_aggregation=True, screen_updates=True).problems()
    )
    assert not RoundConfig(strategy="fedadam", secure_aggregation=True).problems()


def test_dp_fedavg_adds_noise_of_the_configured_scale_and_books_it(handlers, round_env, tmp_path):
    clip, z = 0.5, 1.0
    env = round_env(InProcessFleet(handlers), tmp_path / "dp")
    config = RoundConfig(min_sites=3, seed=7, dp_clip=clip, dp_noise_multiplier=z, campaign="c1")
    result = _round(env, config)
    assert result.success, result.error
    key = result.round_key
    start = load_weights(Path(env.store.read_json(key, "plan.json")["start_path"])).weights
    candidate = _candidate(env, result)
    clipped_mean = dict.fromkeys(start, 0.0)
    updates = sorted((env.store.round_dir(key) / "updates").glob("*.twt"))
    for path in updates:
        w = load_weights(path).weights
        norm = np.sqrt(
            sum(
                float(np.sum((w[k].astype(np.float64) - start[k]) ** 2))
                for k in start
                if start[k].dtype.kind == "f"
            )
        )
        assert norm <= clip * (1 + 1e-4)  # every site clipped
        for k in start:
            if start[k].dtype.kind == "f":
                clipped_mean[k] = clipped_mean[k] + (w[k].astype(np.float64) - start[k])
    m = len(updates)
    # the standardisation buffers are not learnt: no noise on them
    for name in ("numeric_mean", "numeric_std", "target_mean", "target_std"):
        np.testing.assert_array_equal(candidate[name], start[name])
        clipped_mean.pop(name)
    # candidate - start = (sum of clipped updates + N(0, (z clip)^2)) / m: the residual is the noise
    residual = np.concatenate(
        [
            ((candidate[k].astype(np.float64) - start[k]) * m - clipped_mean[k]).ravel()
            for k in clipped_mean
            if start[k].dtype.kind == "f"
        ]
    )
    assert residual.size > 1000
    assert abs(residual.std() / (z * clip) - 1) < 0.1
    assert abs(residual.mean()) < 4 * z * clip / np.sqrt(residual.size)
    ledger = env.store.ledger()
    assert [e.event.mechanism for e in ledger.entries] == ["dp_fedavg"]
    epsilon = ledger.spent("federation", 1e-5)
    assert epsilon == pytest.approx(4.7285, abs=1e-3)  # one Gaussian step, z=1, every site
    # the governance reviewer's view: version tags and the model card
    (version,) = env.versions()
    assert version.tags["privacy.epsilon.federation"] == f"{epsilon:.4f}"
    assert version.tags["privacy.dp_fedavg"] == '{"clip": 0.5, "noise_multiplier": 1.0}'
    assert version.tags["privacy.secure_aggregation"] == "off"
    assert version.tags["privacy.transport"] == "in-process (no network)"
    assert "## Privacy" in version.description
    assert f"| federation | {epsilon:.3f} | {epsilon:.3f} |" in version.description


def test_a_round_over_the_privacy_budget_is_refused_before_it_starts(handlers, round_env, tmp_path):
    env = round_env(InProcessFleet(handlers), tmp_path / "budget")
    config = RoundConfig(
        min_sites=3,
        seed=8,
        dp_clip=0.5,
        dp_noise_multiplier=1.0,
        privacy_budget=6.0,
        privacy_delta=1e-5,
    )
    with dg.instance_for_test() as inst:
        first = run_round(env.defs, inst, config, round_key="r0001")
        second = run_round(env.defs, inst, config, round_key="r0002")
    assert first.success, first.error
    # one round of the Gaussian mechanism at z=1 with every site costs 4.73 at 1e-5; two 7.08
    assert not second.success
    assert "refused: it would exceed the privacy budget" in second.error
    assert "federation: epsilon" in second.error and "> budget 6" in second.error
    assert not (env.store.round_dir("r0002") / "updates").exists() or not any(
        (env.store.round_dir("r0002") / "updates").iterdir()
    )
    assert len(env.store.ledger().entries) == 1


def test_dp_sgd_spending_is_booked_per_site_and_the_budget_stops_the_next_round(
    handlers, round_env, tmp_path
):
    env = round_env(InProcessFleet(handlers), tmp_path / "dpsgd")
    config = RoundConfig(
        min_sites=3,
        seed=9,
        dpsgd_noise_multiplier=1.0,
        dpsgd_clip=1.0,
        privacy_budget=100.0,
        regression_tolerance=10.0,
        site_regression_tolerance=10.0,
    )
    with dg.instance_for_test() as inst:
        first = run_round(env.defs, inst, config, round_key="r0001")
        assert first.success, first.error
        ledger = env.store.ledger()
        assert set(ledger.scopes) == set(SITES)
        assert {e.campaign for e in ledger.entries} == {"default"}  # a lone run, no campaign
        spent = {s: ledger.spent(s, 1e-5) for s in SITES}
        # what the plan promised is what the sites then reported (training patients, not all)
        plan = env.store.read_json("r0001", "plan.json")
        for site in SITES:
            assert plan["privacy"]["epsilon_after_round"][site] == pytest.approx(
                spent[site], abs=1e-3
            )
        tight = config.model_copy(update={"privacy_budget": max(spent.values()) + 0.01})
        second = run_round(env.defs, inst, tight, round_key="r0002")
    assert not second.success
    worst = max(spent, key=spent.get)
    assert f"{worst}: epsilon {spent[worst]:.2f} spent" in second.error, second.error
    assert len(env.store.ledger().entries) == len(SITES)  # the refused round spent nothing


def test_secure_aggregation_is_on_by_default_in_production_mode_only():
    assert RoundConfig().for_fleet(production=True).secure_aggregation is True
    assert RoundConfig().for_fleet(production=False).secure_aggregation is False
    assert RoundConfig(secure_aggregation=False).for_fleet(True).secure_aggregation is False
    # a robust strategy in production mode must say so explicitly
    problems = " ".join(RoundConfig(strategy="median").for_fleet(True).problems())
    assert "set secure_aggregation: false to run it" in problems
    assert not RoundConfig(strategy="median", secure_aggregation=False).for_fleet(True).problems()
