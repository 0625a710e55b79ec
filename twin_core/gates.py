"""Validation gates a candidate must pass before it is registered, and the promotion rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from twin_core.weights import non_finite_tensors


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    detail: str
    facts: dict = field(default_factory=dict)


def quorum_gate(succeeded: int, min_sites: int) -> GateResult:
    passed = succeeded >= min_sites
    detail = f"{succeeded} site(s) returned a valid update; quorum is {min_sites}"
    return GateResult(
        "quorum_met", passed, detail, {"succeeded": succeeded, "min_sites": min_sites}
    )


def finite_gate(weights: Mapping[str, np.ndarray]) -> GateResult:
    bad = non_finite_tensors(weights)
    detail = "all weights finite" if not bad else f"non-finite values in {bad}"
    return GateResult("weights_finite", not bad, detail, {"non_finite_tensors": len(bad)})


def allowed_value(champion: float, tolerance: float) -> float:
    """The worst value a lower-is-better metric may take: champion worsened by `tolerance`."""
    return champion + tolerance * max(abs(champion), 1e-12)


def coverage_gate(coverage: float | None, bounds: tuple[float, float] | None) -> GateResult:
    """The twin's 90 % intervals must cover between `bounds` of the observed outcomes: too low
    is overconfident, too high is uninformative. No bounds: the gate is off."""
    name = "interval_coverage"
    if not bounds:
        facts = {} if coverage is None else {"coverage": coverage}
        return GateResult(name, True, "no coverage gate configured", facts)
    low, high = bounds
    if coverage is None or not math.isfinite(coverage):
        facts = {"low": low, "high": high}
        return GateResult(name, False, "no interval coverage was measured", facts)
    passed = low <= coverage <= high
    verb = "within" if passed else "outside"
    detail = f"90 % interval coverage {coverage:.3f} {verb} [{low:g}, {high:g}]"
    return GateResult(name, passed, detail, {"coverage": coverage, "low": low, "high": high})


def regression_gate(
    candidate: float, champion: float | None, tolerance: float, metric: str = "loss"
) -> GateResult:
    """Candidate's pooled `metric` (lower is better) may be at most `tolerance` (relative) worse."""
    name = "no_pooled_regression"
    if not math.isfinite(candidate):
        return GateResult(name, False, f"pooled {metric} is {candidate}", {"candidate": candidate})
    if champion is None:
        return GateResult(name, True, "no champion yet", {"candidate": candidate})
    limit = allowed_value(champion, tolerance)
    passed = candidate <= limit
    verb = "within" if passed else "worse than"
    detail = (
        f"pooled {metric} {candidate:.5g} {verb} the champion's {champion:.5g} "
        f"(+{tolerance:.1%} allows {limit:.5g})"
    )
    facts = {"candidate": candidate, "champion": champion, "limit": limit}
    return GateResult(name, passed, detail, facts)


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reasons: tuple[str, ...]


def decide_promotion(
    candidate: float,
    candidate_sites: Mapping[str, float],
    champion: float | None,
    champion_sites: Mapping[str, float],
    *,
    gates_passed: bool,
    site_tolerance: float,
) -> PromotionDecision:
    """Whether a challenger may replace the champion (losses: lower is better).

    Only if every gate passed, it beats the champion's pooled loss, and no site it shares with
    the champion got worse by more than `site_tolerance` (relative). The reasons say why not,
    or on what grounds yes.
    """
    if not gates_passed:
        return PromotionDecision(False, ("a validation gate failed",))
    if not math.isfinite(candidate):
        return PromotionDecision(False, (f"pooled loss is {candidate}",))
    if champion is None:
        return PromotionDecision(True, ("no champion yet",))
    reasons = []
    if candidate >= champion:
        reasons.append(f"pooled loss {candidate:.5g} does not beat the champion's {champion:.5g}")
    for site in sorted(set(candidate_sites) & set(champion_sites)):
        before, after = champion_sites[site], candidate_sites[site]
        change = (after - before) / max(abs(before), 1e-12)
        if change > site_tolerance:
            reasons.append(
                f"{site} regresses: loss {before:.5g} -> {after:.5g} ({change:+.1%}, "
                f"tolerance {site_tolerance:.0%})"
            )
    if reasons:
        return PromotionDecision(False, tuple(reasons))
    return PromotionDecision(
        True,
        (
            f"pooled loss {candidate:.5g} beats {champion:.5g}; no site regresses beyond "
            f"{site_tolerance:.0%}",
        ),
    )
