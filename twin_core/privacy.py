"""Differential-privacy bookkeeping: events, their epsilon, clipping, noise and a budget ledger.

Plain functions and values (no Dagster, no gRPC). Two guarantees are accounted here:

- **patient-level DP-SGD at a site** (`twin_core.dp_sgd`, Abadi et al., CCS 2016): scope = the
  site id, one `DpEvent("dp_sgd", sigma, q, steps)` per round with q the Poisson rate at which
  the site samples its patients and steps the optimiser steps it took.
- **site-level DP-FedAvg** (McMahan et al., ICLR 2018): scope = "federation", one
  `DpEvent("dp_fedavg", sigma, sites_chosen / sites_total, 1)` per round; the sites clip their
  updates (`clip_update`) and the orchestrator adds `gaussian_noise` of std sigma * clip to the
  sum.

Both are sampled Gaussian mechanisms. Their epsilon comes from Opacus's Renyi-DP analysis
(Mironov, CSF 2017; Mironov, Talwar and Zhang 2019): RDP curves add over events, and the
conversion to (epsilon, delta) is Opacus's `get_privacy_spent` (Balle et al., AISTATS 2020,
Theorem 21), which is tighter than the "classic" eps = RDP(a) + log(1/delta) / (a - 1) used by
the older papers. Nothing here re-derives the analysis; Opacus is imported lazily (it costs
seconds) inside the functions that need it.

Sampling is treated as Poisson sampling (each patient, or each site, independently with
probability q); a fixed-size choice of sites without replacement is accounted as if it were
Poisson at the same rate, the convention of McMahan et al. (2018). With a handful of sites all
taking part (q = 1), DP-FedAvg's epsilon is large (about 49 at delta 1e-3 for sigma 1 over 50
rounds): it only means something with many sites.

Noise here comes from numpy's PCG64 and is not cryptographically secure, and floating-point
Gaussian noise has known weaknesses (Mironov, CCS 2012); both belong in the threat model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twin_core.errors import InvalidWeights, TwinError

MECHANISMS = ("dp_fedavg", "dp_sgd")
FEDERATION = "federation"  # the scope of site-level DP-FedAvg

# The Renyi orders at which the RDP curve is evaluated. Opacus's default grid (1.1..10.9 in
# steps of 0.1, then 12..63) ends at 63, which is too short for a tight bound when epsilon is
# small (few steps: the best order is large), and starts at 1.1, too high when epsilon is
# large (the best order approaches 1). Every order gives a valid bound; more orders only make
# it tighter. Hence: the default grid plus 1.01..1.05 below and 64..1024 above.
RDP_ORDERS: tuple[float, ...] = (
    (1.01, 1.02, 1.03, 1.05)
    + tuple(1 + x / 10 for x in range(1, 100))
    + tuple(float(a) for a in range(12, 64))
    + (64.0, 72.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 256.0, 320.0, 384.0, 512.0)
    + (640.0, 768.0, 1024.0)
)


class PrivacyBudgetExceeded(TwinError):
    """A planned round would take one or more scopes over the privacy budget.

    Attributes:
        over: (scope, epsilon spent so far, epsilon after the planned round) per scope over.
        budget: the epsilon budget.
        delta: the delta at which epsilon is reported.
    """

    def __init__(
        self, over: Sequence[tuple[str, float, float]], budget: float, delta: float
    ) -> None:
        self.over = tuple(over)
        self.budget = budget
        self.delta = delta
        super().__init__(
            "; ".join(
                f"{scope}: epsilon {spent:.2f} spent, {after:.2f} after this round > budget "
                f"{float(budget)} at delta {delta:g}"
                for scope, spent, after in self.over
            )
        )


# ---- events and their epsilon ------------------------------------------------------------------
@dataclass(frozen=True)
class DpEvent:
    """`steps` compositions of a Poisson-sampled Gaussian mechanism.

    noise_multiplier: the noise std over the sensitivity (the clip norm).
    sample_rate: the probability that a given unit (patient or site) is in a step.
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"unknown DP mechanism {self.mechanism!r} (one of {MECHANISMS})")
        if not self.noise_multiplier >= 0 or math.isinf(self.noise_multiplier):
            raise ValueError(f"noise multiplier must be finite and >= 0: {self.noise_multiplier}")
        if not 0 <= self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in [0, 1]: {self.sample_rate}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0: {self.steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DpEvent:
        return cls(
            str(d["mechanism"]),
            float(d["noise_multiplier"]),
            float(d["sample_rate"]),
            int(d["steps"]),
        )


def planned_dpsgd_event(
    noise_multiplier: float, batch_size: int, n_patients: int, epochs: int, local_steps: int = 0
) -> DpEvent:
    """What `epochs` epochs (or `local_steps` steps) of patient-level DP-SGD at a site will
    spend: Poisson rate q = min(1, batch_size / n_patients), ceil(1 / q) steps per epoch (as
    `dp_sgd` runs)."""
    if batch_size < 1 or n_patients < 1:
        raise ValueError(f"need batch_size >= 1 and n_patients >= 1: {batch_size}, {n_patients}")
    q = min(1.0, batch_size / n_patients)
    steps = local_steps if local_steps > 0 else int(epochs) * math.ceil(1 / q)
    return DpEvent("dp_sgd", float(noise_multiplier), q, steps)


def planned_fedavg_event(noise_multiplier: float, sites_chosen: int, sites_total: int) -> DpEvent:
    """One round of site-level DP-FedAvg: q = sites_chosen / sites_total, one step."""
    if not 0 <= sites_chosen <= sites_total or sites_total < 1:
        raise ValueError(f"cannot choose {sites_chosen} of {sites_total} sites")
    return DpEvent("dp_fedavg", float(noise_multiplier), sites_chosen / sites_total, 1)


def dpsgd_event_from_metrics(metrics: Mapping[str, float]) -> DpEvent | None:
    """The DP-SGD event a site reports in its training metrics (see `dp_sgd`), or None when
    the site did not train under DP-SGD."""
    if "dpsgd_steps" not in metrics:
        return None
    return DpEvent(
        "dp_sgd",
        float(metrics["dpsgd_noise_multiplier"]),
        float(metrics["dpsgd_sample_rate"]),
        int(metrics["dpsgd_steps"]),
    )


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """One step's RDP at `orders` (fractional orders cost ~0.1 s for large q: cached)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)))
    rdp.flags.writeable = False
    return rdp


def rdp_curve(events: Iterable[DpEvent], orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """The composed RDP of `events` at `orders` (Opacus's sampled-Gaussian analysis); inf
    where an event without noise took a step."""
    # RDP is linear in the steps: events with the same (sigma, q) are computed once
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps and e.sample_rate:
            key = (e.noise_multiplier, e.sample_rate)
            merged[key] = merged.get(key, 0) + e.steps
    total = np.zeros(len(orders))
    for (sigma, q), steps in merged.items():
        if sigma == 0:
            return np.full(len(orders), math.inf)
        total += steps * _rdp_one_step(q, sigma, tuple(orders))
    return total


def epsilon(events: Iterable[DpEvent], delta: float) -> float:
    """Epsilon at `delta` of all `events` composed: 0.0 for none (or none with a step), inf if
    an event without noise took a step. Opacus's RDP analysis over `RDP_ORDERS` and its
    (Balle et al. 2020) conversion."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1): {delta}")
    events = list(events)
    if not any(e.steps and e.sample_rate for e in events):
        return 0.0
    rdp = rdp_curve(events)
    if np.isinf(rdp).all():
        return math.inf
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():
        # "optimal order is the largest/smallest alpha": still a valid (if looser) bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _order = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


# ---- clipping and noise ------------------------------------------------------------------------
def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def clip_update(
    delta: Mapping[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale the floating-point arrays of `delta` together so that their global L2 norm is at
    most `clip`; return (clipped copy, norm before clipping).

    The norm and the scaling are float64; each array keeps its dtype. Integer and bool arrays
    (counters, not learnt) pass unchanged and do not count towards the norm. InvalidWeights if
    a floating value is NaN or infinite (such an update cannot be bounded).
    """
    if not clip > 0:
        raise ValueError(f"the clip norm must be > 0: {clip}")
    arrays = {k: np.asarray(v) for k, v in delta.items()}
    squares = 0.0
    for k, a in arrays.items():
        if _is_float(a):
            a64 = a.astype(np.float64)
            if not np.isfinite(a64).all():
                raise InvalidWeights(f"update {k!r} has NaN or infinite values")
            squares += float(np.dot(a64.ravel(), a64.ravel()))
    norm = math.sqrt(squares)
    scale = clip / norm if norm > clip else 1.0
    out = {
        k: ((a.astype(np.float64) * scale).astype(a.dtype) if _is_float(a) else a)
        for k, a in arrays.items()
    }
    return out, norm


def gaussian_noise(
    like: Mapping[str, np.ndarray], std: float, seed: int | Sequence[int] | np.random.SeedSequence
) -> dict[str, np.ndarray]:
    """N(0, std^2) noise for every element of the floating-point arrays of `like`, in their
    shapes and dtypes (drawn as float64), from numpy's default generator seeded with `seed`:
    the same seed and keys (in the same order) give the same noise. Integer and bool arrays are
    left out of the result (nothing is added to them)."""
    if not std >= 0 or math.isinf(std):
        raise ValueError(f"the noise std must be finite and >= 0: {std}")
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in like.items():
        a = np.asarray(v)
        if _is_float(a):
            out[k] = rng.normal(0.0, std, size=a.shape).astype(a.dtype)
    return out


# ---- the ledger ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerEntry:
    round_key: str
    campaign: str
    scope: str
    event: DpEvent

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_key": self.round_key,
            "campaign": self.campaign,
            "scope": self.scope,
            "event": self.event.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LedgerEntry:
        return cls(
            str(d["round_key"]),
            str(d["campaign"]),
            str(d["scope"]),
            DpEvent.from_dict(d["event"]),
        )


class PrivacyLedger:
    """Every DP event spent, by scope (a site id for DP-SGD, "federation" for DP-FedAvg),
    campaign and round.

    Append-only, except that recording a round_key and scope again replaces the earlier entry
    (in its place): a re-executed round must not be counted twice. Not thread-safe; one writer.
    """

    VERSION = 1

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries: dict[tuple[str, str], LedgerEntry] = {}
        for e in entries:
            self._entries[(e.round_key, e.scope)] = e

    def record(self, round_key: str, campaign: str, scope: str, event: DpEvent) -> None:
        self._entries[(round_key, scope)] = LedgerEntry(round_key, campaign, scope, event)

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries.values())

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.scope for e in self._entries.values()))

    def events(
        self, scope: str, campaign: str | None = None, *, except_round: str | None = None
    ) -> list[DpEvent]:
        """The events of `scope` (in one campaign, or all), optionally without one round's."""
        return [
            e.event
            for e in self._entries.values()
            if e.scope == scope
            and (campaign is None or e.campaign == campaign)
            and (except_round is None or e.round_key != except_round)
        ]

    def spent(self, scope: str, delta: float, campaign: str | None = None) -> float:
        """Epsilon at `delta` of everything recorded for `scope` (in `campaign`, or in all:
        a site's patients are the same patients in every campaign)."""
        return epsilon(self.events(scope, campaign), delta)

    def summary(self, delta: float) -> dict[str, dict[str, Any]]:
        """{scope: {"epsilon": over all campaigns, "campaigns": {campaign: epsilon},
        "rounds": entries}} at `delta`."""
        out: dict[str, dict[str, Any]] = {}
        for scope in self.scopes:
            campaigns = dict.fromkeys(
                e.campaign for e in self._entries.values() if e.scope == scope
            )
            out[scope] = {
                "epsilon": self.spent(scope, delta),
                "campaigns": {c: self.spent(scope, delta, c) for c in campaigns},
                "rounds": len(self.events(scope)),
            }
        return out

    def to_json(self) -> str:
        return json.dumps(
            {"version": self.VERSION, "entries": [e.to_dict() for e in self._entries.values()]},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != cls.VERSION:
            raise ValueError("not a privacy ledger (or an unknown version)")
        return cls(LedgerEntry.from_dict(e) for e in doc["entries"])

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file beside `path`, flushed, then os.replace."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, *, missing_ok: bool = False) -> PrivacyLedger:
        """The ledger saved at `path`. A missing file is an error unless `missing_ok` (then an
        empty ledger): a mistyped path must not silently reset a budget."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            if missing_ok:
                return cls()
            raise
        return cls.from_json(text)


def check_budget(
    ledger: PrivacyLedger,
    planned: Mapping[str, Sequence[DpEvent]],
    budget_epsilon: float,
    delta: float,
    campaign: str | None = None,
    *,
    round_key: str | None = None,
) -> dict[str, float]:
    """Refuse a round before it starts: PrivacyBudgetExceeded if, for any scope, the epsilon
    already spent (in `campaign`, or in all) composed with the `planned` events would exceed
    `budget_epsilon` at `delta`. A budget of 0 or inf means no budget. With `round_key`, that
    round's entries already in the ledger are left out (a re-run replaces them, see
    PrivacyLedger.record). Returns epsilon after the round, by scope.
    """
    if budget_epsilon < 0 or math.isnan(budget_epsilon):
        raise ValueError(f"the budget must be >= 0: {budget_epsilon}")
    after: dict[str, float] = {}
    over = []
    for scope, events in planned.items():
        past = ledger.events(scope, campaign, except_round=round_key)
        after[scope] = epsilon([*past, *events], delta)
        if budget_epsilon == 0 or math.isinf(budget_epsilon):
            continue
        if after[scope] > budget_epsilon:
            over.append((scope, epsilon(past, delta), after[scope]))
    if over:
        raise PrivacyBudgetExceeded(over, budget_epsilon, delta)
    return after
