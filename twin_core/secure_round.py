"""One round's training under secure aggregation, as the orchestrator runs it.

advertise -> share -> train and mask -> unmask (twin_core/secagg.py), each step fanned out to
the sites that are still in. A site that fails a step is a SiteFailure like any other; below the
threshold the round stops with SecAggError naming the counts. What comes back is the sum of the
survivors' weighted updates (trained minus start), the sum of their weights, and per site only
what plain rounds also see: examples, steps, training metrics, time, and a masked vector that
is noise on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from twin_core import secagg
from twin_core.dispatch import run_on_sites, split_failures
from twin_core.errors import InvalidWeights
from twin_core.federation import Site, SiteFailure, SiteUpdate, TrainConfig
from twin_core.secagg import MASKED, MaskingPlan, SecAggError
from twin_core.strategies import SiteContribution, planned_steps
from twin_core.weights import Weights


@dataclass(frozen=True)
class SecureRound:
    """The unmasked sum, what it is a sum of, and who fell out where."""

    total: Weights  # sum over survivors of weight_i * (trained_i - start), float64
    weight: float  # sum of the survivors' weights
    updates: dict[str, SiteUpdate]  # each survivor's reply: its masked vector, never weights
    failures: tuple[SiteFailure, ...]
    threshold: int
    shared: tuple[str, ...]


def masking_weight(examples: int, steps: int, config: TrainConfig, weighting: str) -> float:
    """The weight a site applies to its update before masking, and the orchestrator counts in
    the sum: FedAvg's (examples x the share of planned steps done); 1 when uniform or under
    DP-FedAvg."""
    if weighting == "uniform" or config.dp_clip > 0:
        return 1.0
    planned = planned_steps(config.local_epochs, config.batch_size, examples, config.local_steps)
    return float(examples) * SiteContribution("", examples, steps, planned).completion


def run_secure_round(
    sites: Mapping[str, Site],
    round_key: str,
    schema_fingerprint: str,
    start: Mapping[str, np.ndarray],
    config_of: Callable[[str], TrainConfig],
    *,
    threshold: int = 0,
    weighting: str = "examples",
    step_timeout: float = 30.0,
    train_timeout: float = 600.0,
) -> SecureRound:
    """Train at `sites` from `start` with secure aggregation (threshold 0: the smallest
    majority of the sites asked)."""
    threshold = threshold or secagg.default_threshold(len(sites))
    secagg.check_threshold(threshold, len(sites))
    failures: list[SiteFailure] = []

    def step(results):
        answers, failed = split_failures(results)
        failures.extend(failed)
        return answers

    keys = step(
        run_on_sites(
            sites,
            lambda s: s.secagg_advertise(round_key, step_timeout),
            stage="secagg-advertise",
            timeout=step_timeout + 2,
        )
    )
    _enough(keys, sites, threshold, "advertised keys")
    roster = [keys[s] for s in sorted(keys)]
    for site_id, k in keys.items():
        if k.site_id != site_id:
            raise SecAggError(f"{site_id} advertised keys in the name of {k.site_id}")
    sealed = step(
        run_on_sites(
            {s: sites[s] for s in keys},
            lambda s: s.secagg_share(round_key, roster, threshold, step_timeout),
            stage="secagg-share",
            timeout=step_timeout + 2,
        )
    )
    _enough(sealed, sites, threshold, "sealed their shares")
    shared = tuple(sorted(sealed))
    for site_id, shares in sealed.items():
        if any(s.from_site != site_id for s in shares):
            raise SecAggError(f"{site_id} sent shares in another site's name")

    def train(site: Site):
        plan = MaskingPlan(
            shared,
            tuple(x for f in shared for x in sealed[f] if x.to_site == site.site_id),
            weighting,
        )
        update = site.train(
            round_key,
            schema_fingerprint,
            config_of(site.site_id),
            start,
            train_timeout,
            masking=plan,
        )
        vector = update.weights.get(MASKED)
        if set(update.weights) != {MASKED} or vector is None or vector.dtype != np.uint64:
            raise InvalidWeights("a masked round's reply must hold only the masked vector")
        return update

    updates = step(
        run_on_sites(
            {s: sites[s] for s in shared},
            train,
            stage="train",
            timeout=train_timeout + 10,
        )
    )
    _enough(updates, sites, threshold, "sent masked updates")
    survivors = sorted(updates)
    revealed_by = step(
        run_on_sites(
            {s: sites[s] for s in survivors},
            lambda s: s.secagg_unmask(round_key, survivors, step_timeout),
            stage="secagg-unmask",
            timeout=step_timeout + 2,
        )
    )
    _enough(revealed_by, sites, threshold, "answered the unmasking")
    revealed = [r for s in sorted(revealed_by) for r in revealed_by[s] if r.holder == s]
    total = secagg.unmask_sum(
        round_key,
        roster,
        threshold,
        {s: updates[s].weights[MASKED] for s in survivors},
        revealed,
        shared,
    )
    weight = sum(
        masking_weight(updates[s].num_examples, updates[s].steps, config_of(s), weighting)
        for s in survivors
    )
    return SecureRound(
        secagg.decode(total, start),
        weight,
        updates,
        tuple(failures),
        threshold,
        shared,
    )


def _enough(answers: Mapping, sites: Mapping, threshold: int, what: str) -> None:
    if len(answers) < threshold:
        raise SecAggError(
            f"only {len(answers)} of {len(sites)} sites {what}, below the secure-aggregation "
            f"threshold of {threshold}: the round cannot complete"
        )
