"""The values a round passes from step to step, and the pure functions between them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twin_core.federation import ColumnMoments, SiteEvaluation, SiteFailure, SiteInfo
from twin_core.selection import Selection

if TYPE_CHECKING:
    from twin_core.tasks import Task


def site_seed(seed: int, round_key: str, site_id: str) -> int:
    """A site's training seed for a round: fixed by the campaign seed, distinct per site/round."""
    digest = hashlib.sha256(json.dumps([seed, round_key, site_id]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def site_status_of(info: SiteInfo) -> dict:
    """A site's data check and drift status as the round saw it (for the model card)."""
    if info.drift is None:
        drift = "not checked since training"
    else:
        label = "DRIFT" if info.drift.dataset_drift else "no drift"
        drift = f"{label} ({info.drift.drifted_share:.0%} of columns)"
    return {
        "data_check": "passed" if info.data_check_passed else "failed",
        "data_check_score": round(info.data_check_score, 4),
        "drift": drift,
    }


@dataclass(frozen=True)
class RoundPlan:
    round_key: str
    selection: Selection
    schema: dict
    moments: dict[str, ColumnMoments]
    start_path: str  # weights every chosen site starts from
    start_round: str | None  # the round whose candidate that is (None: seeded initialisation)
    start_sha256: str
    config: dict  # the round's run config, as set in the launchpad
    quality: dict[str, float] = field(default_factory=dict)  # data-check score per chosen site
    site_status: dict[str, dict] = field(default_factory=dict)  # data check and drift, per site
    # how the round protects privacy: transport, secure aggregation, DP settings, epsilon after
    privacy: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateRecord:
    """A validated update, persisted at `path`, and what the site said about it."""

    site_id: str
    path: str
    num_examples: int
    steps: int
    metrics: dict[str, float]
    train_seconds: float
    delta_norm: float
    # the update's tensor bytes as they came over the wire (compressed or not) and as stored
    # (the trained weights); 0: not measured (secure aggregation's masked vectors)
    wire_bytes: int = 0
    model_bytes: int = 0


@dataclass(frozen=True)
class RoundUpdates:
    updates: tuple[UpdateRecord, ...]
    failures: tuple[SiteFailure, ...]
    # under secure aggregation: the unmasked sum of the weighted updates and its total weight
    # (the per-site files then hold masked vectors only)
    secure_sum_path: str = ""
    secure_weight: float = 0.0

    @property
    def total_examples(self) -> int:
        return sum(u.num_examples for u in self.updates)

    @classmethod
    def collect(
        cls, results: Mapping[str, UpdateRecord | SiteFailure], failures: Sequence[SiteFailure] = ()
    ) -> RoundUpdates:
        """Split fan-out results into updates and failures (sites in sorted order)."""
        ordered = [results[s] for s in sorted(results)]
        return cls(
            tuple(r for r in ordered if isinstance(r, UpdateRecord)),
            tuple(failures) + tuple(r for r in ordered if isinstance(r, SiteFailure)),
        )


@dataclass(frozen=True)
class Candidate:
    round_key: str
    path: str
    sha256: str
    parameters: int
    sites: tuple[str, ...]
    site_examples: dict[str, int]


@dataclass(frozen=True)
class RoundEvaluation:
    pooled: dict[str, float]
    per_site: dict[str, dict[str, float]]
    examples: dict[str, int]
    failures: tuple[SiteFailure, ...] = field(default=())


def pool_evaluations(task: Task, evaluations: Mapping[str, SiteEvaluation]) -> RoundEvaluation:
    """Pooled metrics from summed sufficient statistics (sites added in sorted order)."""
    totals = dict.fromkeys(task.statistic_names, 0.0)
    per_site: dict[str, dict[str, float]] = {}
    for site_id in sorted(evaluations):
        stats = evaluations[site_id].statistics
        for name in task.statistic_names:
            totals[name] += float(stats.get(name, 0.0))
        per_site[site_id] = task.metrics(stats)
    examples = {s: evaluations[s].num_examples for s in sorted(evaluations)}
    return RoundEvaluation(task.metrics(totals), per_site, examples)
