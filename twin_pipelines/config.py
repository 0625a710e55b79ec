"""Run configuration of a round and of a campaign: what a user edits in the launchpad."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from twin_core.federation import TrainConfig
from twin_core.selection import POLICIES
from twin_core.server_optimizers import OPTIMIZERS, ServerOptimizer
from twin_core.strategies import STRATEGIES, SUMMABLE, Strategy


class RoundConfig(dg.Config):
    """How one federated round runs. Set on `round_plan`; later steps read it from the plan."""

    min_sites: int = Field(default=2, description="quorum: fewer valid updates fail the round")
    selection: str = Field(
        default="all", description="all, random, stratified or fairness (twin_core.selection)"
    )
    fraction: float = Field(default=1.0, description="share of healthy sites to choose (0, 1]")
    max_sites: int = Field(
        default=0, description="at most this many sites train (0: all healthy sites)"
    )
    strategy: str = Field(
        default="fedavg",
        description="fedavg, fedavg_uniform, fedavg_sqrt, fedavg_quality, median, trimmed_mean, "
        "krum, multi_krum, fedavgm, fedadagrad, fedadam or fedyogi (see twin_core.strategies)",
    )
    trim_fraction: float = Field(default=0.2, description="trimmed_mean: share cut at each end")
    krum_f: int = Field(default=1, description="krum: attackers to tolerate (needs n > 2f + 2)")
    krum_m: int = Field(default=1, description="multi_krum: updates averaged")
    server_lr: float = Field(default=1e-2, description="server optimisers: learning rate")
    server_beta1: float = Field(default=0.9, description="server momentum / first moment")
    server_beta2: float = Field(default=0.99, description="server second moment")
    server_tau: float = Field(default=1e-3, description="server adaptivity")
    local_epochs: int = Field(default=2, description="epochs of local training per round")
    local_steps: int = Field(
        default=0,
        description="optimiser steps of local training per round instead of epochs (0: use "
        "local_epochs); equal steps keep large sites from drifting further than small ones",
    )
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = Field(default="adam", description="adam or sgd")
    weight_decay: float = 0.0
    proximal_mu: float = Field(default=0.0, description="FedProx mu at the sites (0: off)")
    time_budget_s: float = Field(
        default=0.0,
        description="local training budget per site; stragglers stop early and count for the "
        "share of their planned steps (0: no budget)",
    )
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
    screen_updates: bool = Field(
        default=False,
        description="reject updates whose norm or direction is an outlier among the round's",
    )
    screen_norm_z: float = Field(default=3.0, description="screening: robust z of the norm")
    screen_min_cosine: float = Field(
        default=0.0, description="screening: least cosine to the median update direction"
    )
    regression_tolerance: float = Field(
        default=0.02,
        description="relative worsening of pooled loss vs. the champion that still passes",
    )
    secure_aggregation: bool | None = Field(
        default=None,
        description="pairwise-masked secure aggregation: the orchestrator sees only the sum of "
        "the sites' updates (fedavg, fedavg_uniform and the server optimisers only). Unset: on "
        "in production mode (mutual TLS), off in local/dev mode",
    )
    secagg_threshold: int = Field(
        default=0,
        description="secure aggregation: sites needed to unmask (0: the smallest majority)",
    )
    dp_clip: float = Field(
        default=0.0,
        description="site-level DP (DP-FedAvg): each site's update clipped to this L2 norm "
        "(0: off); sites then weigh equally",
    )
    dp_noise_multiplier: float = Field(
        default=0.0,
        description="DP-FedAvg: Gaussian noise of this x dp_clip added to the sum of updates",
    )
    dpsgd_noise_multiplier: float = Field(
        default=0.0, description="patient-level DP-SGD at every site: noise multiplier (0: off)"
    )
    dpsgd_clip: float = Field(default=1.0, description="DP-SGD: per-patient gradient L2 clip")
    privacy_budget: float = Field(
        default=0.0,
        description="epsilon each privacy scope (each site under DP-SGD, the federation under "
        "DP-FedAvg) may spend in total; a round that would exceed it is refused (0: no budget)",
    )
    privacy_delta: float = Field(default=1e-5, description="the delta of every epsilon reported")
    campaign: str = Field(
        default="default",
        description="the campaign this round's privacy spending is booked to (default: the "
        "campaign the run belongs to, by its twin/campaign tag)",
    )
    compression: str = Field(
        default="none",
        description="update compression at the sites: none, float16, int8 (per-tensor scale) or "
        "topk (the topk_fraction largest entries of each tensor's update), with error feedback "
        "(what a site does not send it adds to its next update); not with secure aggregation "
        "or scaffold",
    )
    topk_fraction: float = Field(
        default=0.1, description="topk compression: share of each tensor's entries sent (0, 1]"
    )
    coverage_range: list[float] = Field(
        default_factory=list,
        description="patient twin: registration needs the pooled coverage of its 90 % "
        "intervals (every horizon) within [low, high], e.g. [0.85, 0.95]; empty: no gate",
    )

    def problems(self) -> list[str]:
        """What is wrong with this config, in words (empty if nothing)."""
        out = []
        if self.strategy == "scaffold" and self.optimizer != "sgd":
            out.append("strategy scaffold needs optimizer sgd (its control variates assume SGD)")
        if self.selection not in POLICIES:
            out.append(f"unknown selection {self.selection!r} (choose {', '.join(POLICIES)})")
        if not 0 < self.fraction <= 1:
            out.append(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_sites < 1:
            out.append(f"min_sites must be >= 1, got {self.min_sites}")
        if self.max_sites and self.max_sites < self.min_sites:
            out.append(f"max_sites {self.max_sites} is below min_sites {self.min_sites}")
        if self.strategy not in STRATEGIES:
            out.append(f"unknown strategy {self.strategy!r} (choose {', '.join(STRATEGIES)})")
        else:
            try:
                self.aggregation_strategy()
            except ValueError as exc:
                out.append(str(exc))
        if not 0 <= self.trim_fraction < 0.5 or self.krum_f < 0 or self.krum_m < 1:
            out.append("trim_fraction must be in [0, 0.5), krum_f >= 0 and krum_m >= 1")
        if self.optimizer not in ("adam", "sgd"):
            out.append(f"unknown optimizer {self.optimizer!r} (choose adam or sgd)")
        if min(self.local_epochs, self.local_steps) < 0 or self.batch_size < 1:
            out.append("local_epochs >= 0, local_steps >= 0 and batch_size >= 1 are required")
        if not self.learning_rate > 0:
            out.append("learning_rate > 0 is required")
        if min(self.info_timeout_s, self.train_timeout_s, self.eval_timeout_s) <= 0:
            out.append("timeouts must be positive")
        if self.promotion not in ("automatic", "manual"):
            out.append(f"unknown promotion {self.promotion!r} (choose automatic or manual)")
        if not self.max_update_norm > 0 or self.regression_tolerance < 0:
            out.append("max_update_norm must be > 0 and regression_tolerance >= 0")
        out += self._privacy_problems()
        out += self._compression_problems()
        if self.coverage_range and not (
            len(self.coverage_range) == 2
            and 0 <= self.coverage_range[0] < self.coverage_range[1] <= 1
        ):
            out.append(
                f"coverage_range must be [low, high] with 0 <= low < high <= 1, "
                f"got {self.coverage_range}"
            )
        return out

    def _compression_problems(self) -> list[str]:
        from twin_core.compression import METHODS

        if self.compression not in METHODS:
            return [f"unknown compression {self.compression!r} (choose {', '.join(METHODS)})"]
        out = []
        if not 0 < self.topk_fraction <= 1:
            out.append(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.compression == "none":
            return out
        if self.secure_aggregation:
            out.append(
                f"compression {self.compression} cannot run with secure aggregation: the masked "
                "sum needs every site's full update as integers (set compression: none, or "
                "secure_aggregation: false; it is on by default in production mode)"
            )
        if self.strategy == "scaffold":
            out.append(
                f"compression {self.compression} cannot run with strategy scaffold: its control "
                "variates travel beside the update uncompressed and assume the exact update "
                "(set compression: none, or choose another strategy)"
            )
        return out

    def _privacy_problems(self) -> list[str]:
        out = []
        hides = []
        if self.secure_aggregation:
            hides.append("secure aggregation hides each site's update")
        if self.dp_clip > 0:
            hides.append("DP-FedAvg's noise is calibrated to a mean of clipped updates")
        if self.strategy in STRATEGIES and hides and self.strategy not in SUMMABLE:
            out.append(
                f"strategy {self.strategy} cannot run here: {' and '.join(hides)}; choose "
                f"{', '.join(SUMMABLE)}, or turn those off"
                + (
                    " (secure aggregation is on by default in production mode: set "
                    "secure_aggregation: false to run it)"
                    if self.secure_aggregation
                    else ""
                )
            )
        if hides and self.screen_updates:
            out.append(f"screen_updates needs each site's update: {' and '.join(hides)}")
        if self.secagg_threshold < 0:
            out.append("secagg_threshold must be >= 0")
        if self.secure_aggregation and 0 < self.secagg_threshold < 2:
            out.append("secagg_threshold must be at least 2")
        if self.dp_clip < 0 or self.dp_noise_multiplier < 0 or self.dpsgd_noise_multiplier < 0:
            out.append("dp_clip and the noise multipliers must be >= 0")
        if self.dp_noise_multiplier > 0 and not self.dp_clip > 0:
            out.append("dp_noise_multiplier needs dp_clip > 0 (the noise is scaled to the clip)")
        if self.dpsgd_noise_multiplier > 0 and not self.dpsgd_clip > 0:
            out.append("dpsgd_clip must be > 0")
        if not 0 < self.privacy_delta < 1:
            out.append(f"privacy_delta must be in (0, 1), got {self.privacy_delta}")
        if self.privacy_budget < 0:
            out.append("privacy_budget must be >= 0")
        if self.privacy_budget > 0 and not (
            self.dp_noise_multiplier > 0 or self.dpsgd_noise_multiplier > 0
        ):
            out.append(
                "privacy_budget is set but no differential privacy is on (set "
                "dp_noise_multiplier with dp_clip, or dpsgd_noise_multiplier)"
            )
        return out

    def for_fleet(self, production: bool) -> RoundConfig:
        """This config with its defaults that depend on the fleet settled: secure
        aggregation, unless set, is on in production mode (mutual TLS)."""
        if self.secure_aggregation is not None:
            return self
        return self.model_copy(update={"secure_aggregation": production})

    def strategy_params(self) -> dict:
        """The settings that shape this round's strategy (recorded on the registered version)."""
        params: dict = {"proximal_mu": self.proximal_mu, "screen_updates": self.screen_updates}
        if self.strategy == "trimmed_mean":
            params["trim_fraction"] = self.trim_fraction
        if self.strategy in ("krum", "multi_krum"):
            params.update(krum_f=self.krum_f, krum_m=self.krum_m)
        if self.strategy in OPTIMIZERS:
            params.update(
                server_lr=self.server_lr,
                server_beta1=self.server_beta1,
                server_beta2=self.server_beta2,
                server_tau=self.server_tau,
            )
        if self.screen_updates:
            params.update(
                screen_norm_z=self.screen_norm_z, screen_min_cosine=self.screen_min_cosine
            )
        if self.compression != "none":
            params["compression"] = self.compression
            if self.compression == "topk":
                params["topk_fraction"] = self.topk_fraction
        return params

    def aggregation_strategy(self) -> Strategy:
        server = None
        if self.strategy in OPTIMIZERS:
            server = ServerOptimizer(
                self.strategy, self.server_lr, self.server_beta1, self.server_beta2, self.server_tau
            )
        return Strategy(self.strategy, self.trim_fraction, self.krum_f, self.krum_m, server)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            local_epochs=self.local_epochs,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=seed,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            proximal_mu=self.proximal_mu,
            time_budget_s=self.time_budget_s,
            dp_clip=self.dp_clip,
            dpsgd_noise_multiplier=self.dpsgd_noise_multiplier,
            dpsgd_clip=self.dpsgd_clip,
            compression=self.compression,
            topk_fraction=self.topk_fraction,
        )


class CampaignConfig(dg.Config):
    """A campaign: `rounds` rounds with the same round config, chained by a sensor."""

    rounds: int = Field(default=3, description="how many rounds to run")
    round: RoundConfig = RoundConfig()
