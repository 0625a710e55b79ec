"""Which sites take part in a round, and why the others do not.

First every site is checked for health (reachable, same schema, compatible protocol, data check
passed, has training data); then a policy picks among the healthy ones:

all          every healthy site (the largest first when `max_sites` caps them)
random       a seeded random fraction (fixed by the campaign seed and the round key)
stratified   spread over what sites report of themselves in aggregate (size, mean age, outcome
             level, share of each category such as sex): the most unlike sites are chosen, so a
             round never consists only of large, or only of similar, hospitals
fairness     the sites that took part least in recent rounds first
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from twin_core.federation import SiteFailure, SiteInfo


@dataclass(frozen=True, slots=True)
class SiteDecision:
    site_id: str
    chosen: bool
    reason: str
    examples: int = 0


@dataclass(frozen=True)
class Selection:
    """The outcome of selection: chosen sites (sorted), every decision, the federation schema."""

    chosen: tuple[str, ...]
    decisions: tuple[SiteDecision, ...]
    schema_fingerprint: str | None
    compatible: tuple[str, ...]  # sites that may evaluate: reachable, same schema


def federation_fingerprint(infos: Mapping[str, SiteInfo], expected: str | None) -> str | None:
    """The schema the round federates: `expected` if given, else the most common one.

    Ties go to the lexicographically smallest fingerprint, so the choice is deterministic.
    """
    if expected:
        return expected
    counts = Counter(info.schema_fingerprint for info in infos.values())
    if not counts:
        return None
    return min(counts, key=lambda fp: (-counts[fp], fp))


POLICIES = ("all", "random", "stratified", "fairness")
PROTOCOL = "twin_wire.v1"


def _profile(info: SiteInfo) -> list[float]:
    """What a site reports of itself in aggregate: log size, then each column's mean
    (age, outcome level, share of each category...), in column order."""
    return [math.log1p(info.train_examples)] + [
        m.mean for m in sorted(info.moments, key=lambda m: m.column)
    ]


def _spread(eligible: list[SiteInfo], count: int) -> list[str]:
    """Greedy k-center over standardised site profiles: start from the largest site, then
    repeatedly add the site least like any chosen one (ties: larger site, then id)."""
    profiles = {i.site_id: _profile(i) for i in eligible}
    width = min(len(p) for p in profiles.values())
    columns = list(zip(*(profiles[i.site_id][:width] for i in eligible), strict=True))
    scales = [(sum(c) / len(c), (max(c) - min(c)) or 1.0) for c in columns]

    def point(site_id: str) -> list[float]:
        return [(v - m) / s for v, (m, s) in zip(profiles[site_id][:width], scales, strict=True)]

    order = sorted(eligible, key=lambda i: (-i.train_examples, i.site_id))
    chosen = [order[0].site_id]
    while len(chosen) < count:

        def distance(info: SiteInfo) -> float:
            return min(math.dist(point(info.site_id), point(c)) for c in chosen)

        rest = [i for i in order if i.site_id not in chosen]
        chosen.append(max(rest, key=lambda i: (distance(i), i.train_examples, i.site_id)).site_id)
    return sorted(chosen)


def pick(
    eligible: list[SiteInfo],
    policy: str,
    *,
    count: int,
    seed: int = 0,
    round_key: str = "",
    participation: Mapping[str, int] | None = None,
) -> list[str]:
    """`count` site ids out of `eligible` by `policy` (deterministic for the same inputs)."""
    if count >= len(eligible):
        return sorted(i.site_id for i in eligible)
    if policy == "all":
        ranked = sorted(eligible, key=lambda i: (-i.train_examples, i.site_id))
        return sorted(i.site_id for i in ranked[:count])
    if policy == "random":
        digest = hashlib.sha256(f"{seed}/{round_key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        return sorted(rng.sample(sorted(i.site_id for i in eligible), count))
    if policy == "stratified":
        return _spread(eligible, count)
    if policy == "fairness":
        seen = participation or {}
        ranked = sorted(
            eligible, key=lambda i: (seen.get(i.site_id, 0), -i.train_examples, i.site_id)
        )
        return sorted(i.site_id for i in ranked[:count])
    raise ValueError(f"unknown selection policy {policy!r} (choose {', '.join(POLICIES)})")


def select_sites(
    answers: Mapping[str, SiteInfo | SiteFailure],
    *,
    expected_fingerprint: str | None = None,
    max_sites: int | None = None,
    policy: str = "all",
    fraction: float = 1.0,
    min_sites: int = 1,
    seed: int = 0,
    round_key: str = "",
    participation: Mapping[str, int] | None = None,
) -> Selection:
    """Healthy sites (reachable, on the federation's schema and protocol, passing their data
    check, with training data), then `policy` picks ceil(fraction x healthy) of them, at least
    `min_sites` and at most `max_sites`.
    """
    infos = {s: a for s, a in answers.items() if isinstance(a, SiteInfo)}
    fingerprint = federation_fingerprint(infos, expected_fingerprint)
    decisions: dict[str, SiteDecision] = {}
    eligible: list[SiteInfo] = []
    for site_id in sorted(answers):
        answer = answers[site_id]
        if isinstance(answer, SiteFailure):
            decisions[site_id] = SiteDecision(
                site_id, False, f"unreachable: {answer.code}: {answer.reason}"
            )
        elif answer.schema_fingerprint != fingerprint:
            decisions[site_id] = SiteDecision(
                site_id,
                False,
                f"schema {answer.schema_fingerprint} differs from the federation's {fingerprint}",
                answer.train_examples,
            )
        elif answer.versions.get("protocol", PROTOCOL) != PROTOCOL:
            decisions[site_id] = SiteDecision(
                site_id,
                False,
                f"incompatible software: speaks {answer.versions.get('protocol')}, "
                f"the federation {PROTOCOL}",
                answer.train_examples,
            )
        elif not answer.data_check_passed:
            decisions[site_id] = SiteDecision(
                site_id,
                False,
                f"data check failed: {answer.data_check_summary}",
                answer.train_examples,
            )
        elif answer.train_examples <= 0:
            decisions[site_id] = SiteDecision(site_id, False, "no training examples", 0)
        else:
            eligible.append(answer)
    count = max(min_sites, math.ceil(fraction * len(eligible)))
    if max_sites:
        count = min(count, max_sites)
    keep = set(
        pick(
            eligible,
            policy,
            count=count,
            seed=seed,
            round_key=round_key,
            participation=participation,
        )
    )
    for info in eligible:
        chosen = info.site_id in keep
        reason = (
            f"healthy, chosen by policy {policy}"
            if chosen
            else (f"healthy, not chosen by policy {policy} ({count} of {len(eligible)} sites)")
        )
        decisions[info.site_id] = SiteDecision(info.site_id, chosen, reason, info.train_examples)
    compatible = tuple(s for s in sorted(infos) if infos[s].schema_fingerprint == fingerprint)
    return Selection(
        chosen=tuple(sorted(keep)),
        decisions=tuple(decisions[s] for s in sorted(decisions)),
        schema_fingerprint=fingerprint,
        compatible=compatible,
    )
