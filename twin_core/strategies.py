"""How a round's updates become the next global model: the strategies, chosen by name.

fedavg           weighted by examples (McMahan et al., AISTATS 2017); a site that did only part of
                 its planned local steps (a straggler) counts for that part
fedavg_uniform   every site the same weight
fedavg_sqrt      weighted by the square root of examples: between the two, so that a small
                 site is not drowned by a large one nor a large one by many small ones
fedavg_quality   examples x the site's data-check score
median           coordinate-wise median (Yin et al., ICML 2018)
trimmed_mean     coordinate-wise trimmed mean (same paper)
krum, multi_krum (multi-)Krum (Blanchard et al., NeurIPS 2017)
fedavgm, fedadagrad, fedadam, fedyogi
                 FedAvg, then a server optimiser step (twin_core.server_optimizers)
scaffold         SCAFFOLD control variates (twin_core.scaffold); needs SGD at the sites

FedAvg-family strategies stream one update at a time; robust ones need every update at once
and so cannot run under secure aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from twin_core import scaffold
from twin_core.aggregation import WeightedMean
from twin_core.server_optimizers import OPTIMIZERS, ServerOptimizer, ServerState, server_step
from twin_core.weights import Weights

WEIGHTED = ("fedavg", "fedavg_uniform", "fedavg_sqrt", "fedavg_quality")
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum")
STRATEGIES = WEIGHTED + ROBUST + OPTIMIZERS + ("scaffold",)
# the strategies that need only the (weighted) sum of the updates, so secure aggregation and
# DP-FedAvg can run them
SUMMABLE = ("fedavg", "fedavg_uniform") + OPTIMIZERS


@dataclass(frozen=True)
class SiteContribution:
    """What aggregation needs to know of one site's update besides its weights."""

    site_id: str
    num_examples: int
    steps: int  # local steps done
    planned_steps: int  # local steps asked for (0: unknown)
    quality: float = 1.0  # data-check score

    @property
    def completion(self) -> float:
        """Share of the planned local work done (1.0 when unknown)."""
        if self.planned_steps <= 0:
            return 1.0
        return min(1.0, self.steps / self.planned_steps)


@dataclass(frozen=True)
class Strategy:
    name: str = "fedavg"
    trim_fraction: float = 0.2
    krum_f: int = 1
    krum_m: int = 1
    server: ServerOptimizer | None = None

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r} (choose {', '.join(STRATEGIES)})")
        if self.name in OPTIMIZERS and (self.server is None or self.server.name != self.name):
            raise ValueError(f"strategy {self.name!r} needs its server optimiser settings")

    @property
    def needs_individual_updates(self) -> bool:
        return self.name in ROBUST

    def weight(self, site: SiteContribution) -> float:
        """A site's weight in the weighted mean (examples for the server-optimiser family)."""
        if self.name == "fedavg_uniform":
            return 1.0
        if self.name == "fedavg_sqrt":
            return math.sqrt(float(site.num_examples)) * site.completion
        base = float(site.num_examples) * site.completion
        return base * site.quality if self.name == "fedavg_quality" else base


def planned_steps(local_epochs: int, batch_size: int, examples: int, local_steps: int = 0) -> int:
    """The optimiser steps a site was asked for: local_steps, or local_epochs epochs."""
    if local_steps > 0:
        return local_steps
    return local_epochs * math.ceil(examples / batch_size) if batch_size > 0 else 0


def aggregate(
    strategy: Strategy,
    start: Mapping[str, np.ndarray],
    updates: Iterable[tuple[SiteContribution, Mapping[str, np.ndarray]]],
    server_state: ServerState | None = None,
    total_sites: int = 0,
) -> tuple[Weights, ServerState | None, dict]:
    """The next global model from `updates` (given in sorted site order).

    Returns the model, the server optimiser's new state (None for stateless strategies), and
    facts for the record (e.g. which sites Krum selected).
    """
    from twin_core import robust

    if strategy.needs_individual_updates:
        items = list(updates)
        weights = [w for _, w in items]
        if strategy.name == "median":
            return robust.coordinate_median(weights), None, {}
        if strategy.name == "trimmed_mean":
            return robust.trimmed_mean(weights, strategy.trim_fraction), None, {}
        m = 1 if strategy.name == "krum" else strategy.krum_m
        model, chosen = robust.multi_krum(weights, strategy.krum_f, m)
        return model, None, {"selected": [items[i][0].site_id for i in chosen]}
    if strategy.name == "scaffold":
        return _scaffold(start, updates, server_state, total_sites)
    mean = WeightedMean()
    for site, weights in updates:
        mean.add(weights, strategy.weight(site))
    model = mean.result()
    if strategy.server is None:
        return model, None, {}
    stepped, state = server_step(strategy.server, start, model, server_state)
    return stepped, state, {"server_step": state.step}


def _scaffold(
    start: Mapping[str, np.ndarray],
    updates: Iterable[tuple[SiteContribution, Mapping[str, np.ndarray]]],
    state: ServerState | None,
    total_sites: int,
) -> tuple[Weights, ServerState, dict]:
    """x <- the example-weighted mean of y_i (server step size 1; the paper's analysis uses
    equal weights, practice weights by data), c <- c + |S|/N mean(delta c_i)."""
    mean, deltas = WeightedMean(), []
    for site, weights in updates:
        model, delta = scaffold.split(weights, scaffold.DELTA)
        mean.add(model, float(site.num_examples) * site.completion)
        deltas.append(delta)
    control = state.first if state and state.first else scaffold.zeros_like(start)
    new_control = scaffold.server_control(control, deltas, total_sites)
    step = (state.step if state else 0) + 1
    return mean.result(), ServerState(step, dict(new_control), {}), {"server_step": step}


def server_control_of(state: ServerState | None, start: Mapping[str, np.ndarray]) -> Weights:
    """The SCAFFOLD control variate to send with `start` (zeros before the first round)."""
    return dict(state.first) if state and state.first else scaffold.zeros_like(start)
