"""Run configuration of a round and of a campaign: what a user edits in the launchpad."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from twin_core.aggregation import STRATEGIES
from twin_core.federation import TrainConfig


class RoundConfig(dg.Config):
    """How one federated round runs. Set on `round_plan`; later steps read it from the plan."""

    min_sites: int = Field(default=2, description="quorum: fewer valid updates fail the round")
    max_sites: int = Field(
        default=0, description="at most this many sites train (0: all healthy sites)"
    )
    strategy: str = Field(
        default="fedavg",
        description="fedavg (weighted by examples) or fedavg_quality (x data-check score)",
    )
    local_epochs: int = Field(default=2, description="epochs of local training per round")
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = Field(default="adam", description="adam or sgd")
    weight_decay: float = 0.0
    seed: int = Field(default=7, description="seeds the initial model and every site's shuffling")
    info_timeout_s: float = Field(default=15.0, description="deadline of each site-info call")
    train_timeout_s: float = Field(default=600.0, description="deadline of each training call")
    eval_timeout_s: float = Field(default=120.0, description="deadline of each evaluation call")
    max_update_norm: float = Field(
        default=1e3, description="reject updates that move the model further (L2)"
    )
    promotion: str = Field(
        default="automatic",
        description="automatic (the policy decides) or manual (a reviewer approves via review_job)",
    )
    site_regression_tolerance: float = Field(
        default=0.05, description="relative worsening of any site's loss that blocks promotion"
    )
    regression_tolerance: float = Field(
        default=0.02,
        description="relative worsening of pooled loss vs. the champion that still passes",
    )

    def problems(self) -> list[str]:
        """What is wrong with this config, in words (empty if nothing)."""
        out = []
        if self.min_sites < 1:
            out.append(f"min_sites must be >= 1, got {self.min_sites}")
        if self.max_sites and self.max_sites < self.min_sites:
            out.append(f"max_sites {self.max_sites} is below min_sites {self.min_sites}")
        if self.strategy not in STRATEGIES:
            out.append(f"unknown strategy {self.strategy!r} (choose {', '.join(STRATEGIES)})")
        if self.optimizer not in ("adam", "sgd"):
            out.append(f"unknown optimizer {self.optimizer!r} (choose adam or sgd)")
        if self.local_epochs < 0 or self.batch_size < 1 or not self.learning_rate > 0:
            out.append("local_epochs >= 0, batch_size >= 1 and learning_rate > 0 are required")
        if min(self.info_timeout_s, self.train_timeout_s, self.eval_timeout_s) <= 0:
            out.append("timeouts must be positive")
        if self.promotion not in ("automatic", "manual"):
            out.append(f"unknown promotion {self.promotion!r} (choose automatic or manual)")
        if not self.max_update_norm > 0 or self.regression_tolerance < 0:
            out.append("max_update_norm must be > 0 and regression_tolerance >= 0")
        return out

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=seed,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
        )


class CampaignConfig(dg.Config):
    """A campaign: `rounds` rounds with the same round config, chained by a sensor."""

    rounds: int = Field(default=3, description="how many rounds to run")
    round: RoundConfig = RoundConfig()
