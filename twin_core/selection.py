"""Which sites take part in a round, and why the others do not."""

from __future__ import annotations

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


def select_sites(
    answers: Mapping[str, SiteInfo | SiteFailure],
    *,
    expected_fingerprint: str | None = None,
    max_sites: int | None = None,
) -> Selection:
    """Every healthy site: reachable, on the federation's schema, passing its data check, with
    training data.

    With `max_sites`, the largest sites (by training examples, then id) are kept.
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
    ranked = sorted(eligible, key=lambda i: (-i.train_examples, i.site_id))
    keep = {i.site_id for i in ranked[: max_sites if max_sites else len(ranked)]}
    for info in eligible:
        chosen = info.site_id in keep
        reason = "healthy" if chosen else f"max_sites={max_sites} reached"
        decisions[info.site_id] = SiteDecision(info.site_id, chosen, reason, info.train_examples)
    compatible = tuple(s for s in sorted(infos) if infos[s].schema_fingerprint == fingerprint)
    return Selection(
        chosen=tuple(sorted(keep)),
        decisions=tuple(decisions[s] for s in sorted(decisions)),
        schema_fingerprint=fingerprint,
        compatible=compatible,
    )
