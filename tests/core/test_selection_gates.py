"""Tests for site selection, validation gates, round seeds and pooled column moments."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from twin_core.federation import ColumnMoments, SiteFailure, SiteInfo, pool_moments
from twin_core.gates import (
    allowed_value,
    decide_promotion,
    finite_gate,
    quorum_gate,
    regression_gate,
)
from twin_core.rounds import site_seed
from twin_core.selection import federation_fingerprint, select_sites

FP_A = "aaaa000000000000"
FP_B = "bbbb000000000000"


def _info(site_id: str, train: int = 100, fingerprint: str = FP_A) -> SiteInfo:
    return SiteInfo(
        site_id=site_id,
        task="patient_twin",
        schema={"task": "patient_twin"},
        schema_fingerprint=fingerprint,
        units=train // 5,
        train_examples=train,
        holdout_examples=train // 4,
        moments=(),
    )


def _failure(site_id: str, code: str = "UNAVAILABLE", reason: str = "connection refused"):
    return SiteFailure(site_id, "info", code, reason)


def _decision(selection, site_id: str):
    [d] = [d for d in selection.decisions if d.site_id == site_id]
    return d


# ---- select_sites -----------------------------------------------------------------------------
def test_all_healthy_sites_chosen_and_sorted():
    answers = {s: _info(s, 10 * (i + 1)) for i, s in enumerate(["site-3", "site-1", "site-2"])}
    sel = select_sites(answers)
    assert sel.chosen == ("site-1", "site-2", "site-3")
    assert [d.site_id for d in sel.decisions] == ["site-1", "site-2", "site-3"]
    assert all(d.chosen and d.reason == "healthy, chosen by policy all" for d in sel.decisions)
    assert {d.site_id: d.examples for d in sel.decisions} == {
        "site-3": 10,
        "site-1": 20,
        "site-2": 30,
    }
    assert sel.schema_fingerprint == FP_A
    assert sel.compatible == ("site-1", "site-2", "site-3")


def test_unreachable_site_skipped_with_code_in_reason():
    answers = {
        "site-1": _info("site-1"),
        "site-2": _failure("site-2", "DEADLINE_EXCEEDED", "no answer within 5 s"),
        "site-3": _info("site-3"),
    }
    sel = select_sites(answers)
    assert sel.chosen == ("site-1", "site-3")
    d = _decision(sel, "site-2")
    assert not d.chosen
    assert "DEADLINE_EXCEEDED" in d.reason and "no answer within 5 s" in d.reason
    assert d.reason.startswith("unreachable")
    assert "site-2" not in sel.compatible


def test_schema_mismatch_skipped():
    answers = {
        "site-1": _info("site-1"),
        "site-2": _info("site-2"),
        "site-3": _info("site-3", 500, fingerprint=FP_B),
    }
    sel = select_sites(answers)
    assert sel.schema_fingerprint == FP_A
    assert sel.chosen == ("site-1", "site-2")
    d = _decision(sel, "site-3")
    assert not d.chosen and d.examples == 500
    assert FP_B in d.reason and FP_A in d.reason
    assert sel.compatible == ("site-1", "site-2")


def test_expected_fingerprint_honoured_even_against_majority():
    answers = {
        "site-1": _info("site-1", fingerprint=FP_A),
        "site-2": _info("site-2", fingerprint=FP_A),
        "site-3": _info("site-3", fingerprint=FP_B),
    }
    sel = select_sites(answers, expected_fingerprint=FP_B)
    assert sel.schema_fingerprint == FP_B
    assert sel.chosen == ("site-3",)
    assert sel.compatible == ("site-3",)
    assert not _decision(sel, "site-1").chosen


def test_expected_fingerprint_no_site_matches():
    sel = select_sites({"site-1": _info("site-1")}, expected_fingerprint="cccc")
    assert sel.chosen == () and sel.compatible == ()
    assert sel.schema_fingerprint == "cccc"


def test_majority_fingerprint_wins():
    answers = {
        "a": _info("a", fingerprint=FP_B),
        "b": _info("b", fingerprint=FP_A),
        "c": _info("c", fingerprint=FP_B),
    }
    assert select_sites(answers).chosen == ("a", "c")
    assert federation_fingerprint(answers, None) == FP_B


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_majority_tie_broken_by_smallest_fingerprint(order):
    infos = {"a": _info("a", fingerprint=FP_B), "b": _info("b", fingerprint=FP_A)}
    answers = {k: infos[k] for k in order}
    sel = select_sites(answers)
    assert sel.schema_fingerprint == FP_A  # "aaaa..." < "bbbb..."
    assert sel.chosen == ("b",)


def test_failures_do_not_vote_and_all_failed_gives_no_fingerprint():
    sel = select_sites({"a": _failure("a"), "b": _failure("b", "INTERNAL")})
    assert sel.chosen == () and sel.compatible == ()
    assert sel.schema_fingerprint is None
    assert all(not d.chosen for d in sel.decisions)
    assert "INTERNAL" in _decision(sel, "b").reason
    assert federation_fingerprint({}, None) is None


def test_no_training_examples_skipped_but_may_evaluate():
    answers = {"site-1": _info("site-1", 0), "site-2": _info("site-2", 40)}
    sel = select_sites(answers)
    assert sel.chosen == ("site-2",)
    d = _decision(sel, "site-1")
    assert not d.chosen and d.reason == "no training examples"
    assert sel.compatible == ("site-1", "site-2")


def test_max_sites_keeps_the_largest():
    sizes = {"s1": 10, "s2": 500, "s3": 40, "s4": 300, "s5": 40}
    sel = select_sites({s: _info(s, n) for s, n in sizes.items()}, max_sites=3)
    # 500, 300, then the tie at 40 goes to the smaller id s3
    assert sel.chosen == ("s2", "s3", "s4")
    for s in ("s1", "s5"):
        d = _decision(sel, s)
        assert not d.chosen and d.reason == "healthy, not chosen by policy all (3 of 5 sites)"
        assert d.examples == sizes[s]
    assert sel.compatible == ("s1", "s2", "s3", "s4", "s5")


def test_max_sites_larger_than_fleet_keeps_all():
    sel = select_sites({s: _info(s, 5) for s in ("x", "y")}, max_sites=10)
    assert sel.chosen == ("x", "y")


def test_max_sites_ignores_ineligible_sites():
    answers = {
        "big-other-schema": _info("big-other-schema", 10_000, FP_B),
        "down": _failure("down"),
        "small": _info("small", 1),
        "mid": _info("mid", 50),
        "big": _info("big", 900),
    }
    sel = select_sites(answers, max_sites=2)
    assert sel.chosen == ("big", "mid")
    assert [d.site_id for d in sel.decisions] == sorted(answers)


# ---- gates ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "succeeded, min_sites, passed", [(3, 2, True), (2, 2, True), (1, 2, False), (0, 1, False)]
)
def test_quorum_gate(succeeded, min_sites, passed):
    g = quorum_gate(succeeded, min_sites)
    assert g.name == "quorum_met"
    assert g.passed is passed
    assert g.facts == {"succeeded": succeeded, "min_sites": min_sites}
    assert f"{succeeded} site(s)" in g.detail and f"quorum is {min_sites}" in g.detail


def test_finite_gate_passes_finite_weights():
    g = finite_gate({"w": np.ones((2, 2), np.float32), "n": np.array(3, np.int64)})
    assert g.passed and g.name == "weights_finite"
    assert g.facts == {"non_finite_tensors": 0}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_gate_fails_on_non_finite(bad):
    w = {"ok": np.zeros(3, np.float32), "bad": np.array([1.0, bad], np.float32)}
    g = finite_gate(w)
    assert not g.passed
    assert "bad" in g.detail and "'ok'" not in g.detail
    assert g.facts == {"non_finite_tensors": 1}


def test_regression_gate_without_champion_passes():
    g = regression_gate(3.5, None, 0.05)
    assert g.passed and g.name == "no_pooled_regression"
    assert "no champion" in g.detail


@pytest.mark.parametrize(
    "candidate, champion, tolerance, passed",
    [
        (1.0, 1.0, 0.05, True),  # equal
        (0.9, 1.0, 0.05, True),  # better
        (1.04, 1.0, 0.05, True),  # worse but within 5 %
        (1.05, 1.0, 0.05, True),  # exactly at the limit
        (1.06, 1.0, 0.05, False),  # beyond
        (1.01, 1.0, 0.0, False),  # no tolerance
        # negative champion (e.g. a Gaussian NLL): limit = -2 + 0.1 * 2 = -1.8
        (-1.9, -2.0, 0.1, True),
        (-1.81, -2.0, 0.1, True),
        (-1.79, -2.0, 0.1, False),
        (-2.5, -2.0, 0.1, True),
        # zero champion: any positive value beyond a tiny epsilon fails
        (0.0, 0.0, 0.1, True),
        (1e-6, 0.0, 0.1, False),
    ],
)
def test_regression_gate_tolerance(candidate, champion, tolerance, passed):
    g = regression_gate(candidate, champion, tolerance, metric="nll")
    assert g.passed is passed
    assert g.facts["candidate"] == candidate and g.facts["champion"] == champion
    assert g.facts["limit"] == pytest.approx(champion + tolerance * abs(champion), abs=1e-9)
    assert "pooled nll" in g.detail
    assert ("within" if passed else "worse than") in g.detail


def test_allowed_value_hand_computed():
    assert allowed_value(2.0, 0.1) == pytest.approx(2.2)
    assert allowed_value(-2.0, 0.1) == pytest.approx(-1.8)
    assert allowed_value(0.0, 0.5) == pytest.approx(0.5e-12)


@pytest.mark.parametrize("candidate", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("champion", [None, 1.0, -1.0])
def test_regression_gate_non_finite_candidate_fails(candidate, champion):
    g = regression_gate(candidate, champion, 10.0)
    assert not g.passed
    assert "pooled loss" in g.detail


@pytest.mark.parametrize(
    "candidate, champion, expected",
    [
        (1.0, None, True),
        (0.99, 1.0, True),
        (1.0, 1.0, False),  # strictly better only
        (1.01, 1.0, False),
        (-2.1, -2.0, True),
        (-1.9, -2.0, False),
        (float("nan"), None, False),
        (float("nan"), 1.0, False),
        (float("inf"), None, False),
    ],
)
def test_promotion_needs_a_better_pooled_loss(candidate, champion, expected):
    decision = decide_promotion(candidate, {}, champion, {}, gates_passed=True, site_tolerance=0.05)
    assert decision.promote is expected and decision.reasons


def test_promotion_refuses_a_site_that_regresses_beyond_tolerance():
    champion = {"a": 2.0, "b": 1.0, "c": 3.0}
    # pooled better, but site b worsens by 10 % (> 5 %): refused, and the reason names b
    worse_b = {"a": 1.8, "b": 1.1, "c": 2.9}
    decision = decide_promotion(1.9, worse_b, 2.0, champion, gates_passed=True, site_tolerance=0.05)
    assert not decision.promote
    assert decision.reasons == ("b regresses: loss 1 -> 1.1 (+10.0%, tolerance 5%)",)
    # 4 % worse at b is within tolerance: promoted
    fine = {"a": 1.8, "b": 1.04, "c": 2.9}
    assert decide_promotion(
        1.9, fine, 2.0, champion, gates_passed=True, site_tolerance=0.05
    ).promote
    # a site the champion never saw cannot regress
    new_site = {**fine, "d": 50.0}
    assert decide_promotion(
        1.9, new_site, 2.0, champion, gates_passed=True, site_tolerance=0.05
    ).promote


def test_promotion_never_follows_a_failed_gate():
    decision = decide_promotion(0.1, {}, None, {}, gates_passed=False, site_tolerance=1.0)
    assert not decision.promote and decision.reasons == ("a validation gate failed",)


# ---- site_seed --------------------------------------------------------------------------------
def test_site_seed_deterministic_and_in_range():
    a = site_seed(7, "2024-01-01", "site-1")
    assert a == site_seed(7, "2024-01-01", "site-1")
    assert isinstance(a, int) and 0 <= a < 2**63


def test_site_seed_distinct_per_site_round_and_campaign():
    seeds = {
        (seed, rk, s): site_seed(seed, rk, s)
        for seed in (0, 1)
        for rk in ("r1", "r2", "r3")
        for s in ("site-1", "site-2", "site-3", "site-4")
    }
    assert len(set(seeds.values())) == len(seeds)


# ---- moments ----------------------------------------------------------------------------------
def test_column_moments_mean_std_hand_computed():
    # values 2, 4, 4, 4, 5, 5, 7, 9: sum 40, sum of squares 232, mean 5,
    # sample variance (232 - 40*40/8) / 7 = 32/7
    m = ColumnMoments("x", 8.0, 40.0, 232.0)
    assert m.mean == 5.0
    assert m.std == pytest.approx(math.sqrt(32 / 7), rel=1e-12)
    v = np.array([2, 4, 4, 4, 5, 5, 7, 9], dtype=float)
    assert m.std == pytest.approx(float(v.std(ddof=1)), rel=1e-12)


@pytest.mark.parametrize(
    "m, mean, std",
    [
        (ColumnMoments("x", 0.0, 0.0, 0.0), 0.0, 1.0),  # empty
        (ColumnMoments("x", 1.0, 3.0, 9.0), 3.0, 1.0),  # one value: no spread
        (ColumnMoments("x", 3.0, 6.0, 12.0), 2.0, 1.0),  # constant column: 2, 2, 2
        (ColumnMoments("x", 2.0, 0.0, 2.0), 0.0, math.sqrt(2.0)),  # -1, 1
    ],
    ids=["empty", "single", "constant", "pm-one"],
)
def test_column_moments_degenerate_cases(m, mean, std):
    assert m.mean == pytest.approx(mean)
    assert m.std == pytest.approx(std)


def test_pool_moments_sums_per_column():
    site_1 = [ColumnMoments("age", 2.0, 100.0, 5200.0), ColumnMoments("y", 3.0, 6.0, 14.0)]
    site_2 = [ColumnMoments("age", 3.0, 180.0, 10900.0), ColumnMoments("y", 1.0, -1.0, 1.0)]
    site_3 = [ColumnMoments("bmi", 1.0, 25.0, 625.0)]
    pooled = pool_moments([site_1, site_2, site_3])
    assert pooled == {
        "age": ColumnMoments("age", 5.0, 280.0, 16100.0),
        "y": ColumnMoments("y", 4.0, 5.0, 15.0),
        "bmi": ColumnMoments("bmi", 1.0, 25.0, 625.0),
    }
    assert list(pooled) == ["age", "y", "bmi"]
    assert pool_moments([]) == {}


def test_pooled_moments_match_direct_computation():
    rng = np.random.default_rng(3)
    parts = [rng.normal(50, 10, size=n) for n in (5, 17, 40)]
    per_site = [[ColumnMoments("x", float(p.size), float(p.sum()), float(p @ p))] for p in parts]
    pooled = pool_moments(per_site)["x"]
    everything = np.concatenate(parts)
    assert pooled.count == everything.size
    assert pooled.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert pooled.std == pytest.approx(everything.std(ddof=1), rel=1e-9)


def _fleet(sizes: dict[str, int]) -> dict:
    return {s: _info(s, n) for s, n in sizes.items()}


SIZES = {"s1": 20, "s2": 60, "s3": 150, "s4": 400, "s5": 1200, "s6": 90}


def test_random_fraction_is_seeded_by_campaign_seed_and_round():
    one = select_sites(_fleet(SIZES), policy="random", fraction=0.5, seed=7, round_key="r0001")
    again = select_sites(_fleet(SIZES), policy="random", fraction=0.5, seed=7, round_key="r0001")
    other = [
        select_sites(
            _fleet(SIZES), policy="random", fraction=0.5, seed=7, round_key=f"r{k:04d}"
        ).chosen
        for k in range(2, 8)
    ]
    assert len(one.chosen) == 3 and one.chosen == again.chosen
    assert any(c != one.chosen for c in other)  # the round key reshuffles


def test_stratified_spreads_over_site_sizes():
    sel = select_sites(_fleet(SIZES), policy="stratified", fraction=0.5)
    # greedy k-center on log size: the largest (s5, 1200), the least like it (s1, 20), then the
    # one furthest from both (s3, 150: log distances 1.98 vs s6 1.47, s4 1.10, s2 1.07)
    assert sel.chosen == ("s1", "s3", "s5")
    assert select_sites(_fleet(SIZES), fraction=0.5).chosen == ("s3", "s4", "s5")  # all: largest


def test_stratified_keeps_the_case_mix_representative():
    def site(name: str, women: float, age: float) -> SiteInfo:
        moments = (
            ColumnMoments("age", 100, 100 * age, 0.0),
            ColumnMoments("sex=1", 100, 100 * women, 100 * women),
        )
        return dataclasses.replace(_info(name, 400), moments=moments)

    fleet = {
        "a": site("a", 0.5, 60),
        "b": site("b", 0.52, 61),
        "c": site("c", 0.2, 45),
        "d": site("d", 0.8, 70),
    }
    # equal sizes: the tie goes to id a, then the most unlike sites (c and d), not b (like a)
    assert select_sites(fleet, policy="stratified", max_sites=3).chosen == ("a", "c", "d")


def test_fairness_prefers_sites_that_took_part_least():
    seen = {"s5": 4, "s4": 4, "s3": 4, "s1": 1, "s2": 0}
    sel = select_sites(_fleet(SIZES), policy="fairness", fraction=0.5, participation=seen)
    assert sel.chosen == ("s1", "s2", "s6")  # never seen s6 (0) and s2 (0), then s1 (1)


def test_min_and_max_sites_bound_the_fraction_and_software_must_match():
    assert len(select_sites(_fleet(SIZES), policy="random", fraction=0.1, min_sites=2).chosen) == 2
    assert len(select_sites(_fleet(SIZES), policy="random", max_sites=2).chosen) == 2
    fleet = _fleet({"a": 10, "b": 10})
    fleet["b"] = dataclasses.replace(fleet["b"], versions={"protocol": "twin_wire.v0"})
    sel = select_sites(fleet)
    assert sel.chosen == ("a",)
    assert _decision(sel, "b").reason.startswith("incompatible software: speaks twin_wire.v0")
