"""The values that cross between the orchestrator and a site, and the `Site` port.

Everything here is aggregate: counts, sums, metrics and model weights. Nothing can hold a row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twin_core.monitoring import DriftSummary, QualityReport
from twin_core.weights import Weights

if TYPE_CHECKING:
    from twin_core.secagg import AdvertisedKeys, MaskingPlan, RevealedShare, SealedShare


@dataclass(frozen=True, slots=True)
class ColumnMoments:
    """Count, sum and sum of squares of one numeric column at one site (or pooled)."""

    column: str
    count: float
    sum: float
    sum_squares: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if self.count < 2:
            return 1.0
        var = (self.sum_squares - self.sum * self.sum / self.count) / (self.count - 1)
        return math.sqrt(var) if var > 1e-12 else 1.0


def pool_moments(per_site: Iterable[Iterable[ColumnMoments]]) -> dict[str, ColumnMoments]:
    """Add up the sites' moments column by column (sites in the order given)."""
    pooled: dict[str, ColumnMoments] = {}
    for moments in per_site:
        for m in moments:
            p = pooled.get(m.column)
            pooled[m.column] = (
                m
                if p is None
                else ColumnMoments(
                    m.column, p.count + m.count, p.sum + m.sum, p.sum_squares + m.sum_squares
                )
            )
    return pooled


@dataclass(frozen=True)
class SiteInfo:
    site_id: str
    task: str
    schema: dict
    schema_fingerprint: str
    units: int
    train_examples: int
    holdout_examples: int
    moments: tuple[ColumnMoments, ...]
    versions: dict[str, str] = field(default_factory=dict)
    data_check_passed: bool = True
    data_check_score: float = 1.0
    data_check_summary: str = ""
    drift: DriftSummary | None = None  # the latest drift summary, without per-feature detail
    train_units: int = 0  # patients in the training split (0: unknown, an older site)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adam"
    proximal_mu: float = 0.0  # FedProx (Li et al., MLSys 2020): pull towards the global model
    time_budget_s: float = 0.0  # a straggler stops early and reports the steps it did
    # site-level DP (DP-FedAvg, McMahan et al., ICLR 2018): the site clips its update (the
    # trained weights minus the start) to this L2 norm before it leaves; the orchestrator adds
    # the noise to the sum. 0: off
    dp_clip: float = 0.0
    # patient-level DP-SGD at the site: each patient's gradient clipped to dpsgd_clip, Gaussian
    # noise of dpsgd_noise_multiplier * dpsgd_clip added to every step's sum. 0: off
    dpsgd_noise_multiplier: float = 0.0
    dpsgd_clip: float = 1.0
    # optimiser steps per round instead of epochs (0: local_epochs epochs). Equal steps at every
    # site keep large sites from drifting further than small ones each round (FedAvg's
    # objective then weighs sites by examples, not by examples x their steps)
    local_steps: int = 0
    # update compression (twin_core.compression): "none", "float16", "int8" or "topk" (the
    # topk_fraction largest entries of each tensor's delta); the site keeps what it did not
    # send and adds it to its next update (error feedback)
    compression: str = "none"
    topk_fraction: float = 0.1


@dataclass(frozen=True)
class SiteUpdate:
    """A site's locally trained weights and what it took to get them."""

    site_id: str
    round_key: str
    weights: Weights
    num_examples: int
    steps: int
    metrics: dict[str, float]
    train_seconds: float


@dataclass(frozen=True)
class SiteEvaluation:
    """A site's sufficient statistics of the model on its holdout split."""

    site_id: str
    round_key: str
    num_examples: int
    statistics: dict[str, float]
    eval_seconds: float


@dataclass(frozen=True, slots=True)
class SiteFailure:
    """Why a site contributed nothing at one stage of a round. A value, not an exception."""

    site_id: str
    stage: str
    code: str
    reason: str


class Site(Protocol):
    """What the orchestrator can ask of a site, over gRPC or in-process."""

    site_id: str

    def info(self, timeout: float) -> SiteInfo: ...

    def train(
        self,
        round_key: str,
        schema_fingerprint: str,
        config: TrainConfig,
        weights: Mapping,
        timeout: float,
        masking: MaskingPlan | None = None,
    ) -> SiteUpdate: ...

    def evaluate(
        self, round_key: str, schema_fingerprint: str, weights: Mapping, timeout: float
    ) -> SiteEvaluation: ...

    def check_data(self, timeout: float) -> QualityReport: ...

    def drift(self, timeout: float) -> DriftSummary: ...

    # secure aggregation (twin_core/secagg.py): each step of the protocol at this site
    def secagg_advertise(self, round_key: str, timeout: float) -> AdvertisedKeys: ...

    def secagg_share(
        self, round_key: str, roster: Sequence[AdvertisedKeys], threshold: int, timeout: float
    ) -> list[SealedShare]: ...

    def secagg_unmask(
        self, round_key: str, survivors: Sequence[str], timeout: float
    ) -> list[RevealedShare]: ...
