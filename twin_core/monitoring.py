"""What a site reports about its data, as plain values: data-check results and drift summaries.

Both are aggregates by construction: which expectation or column, whether it passed, and what
share of rows failed or how far a distribution moved. Never a value, a row index or an id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ExpectationOutcome:
    """One expectation of a site's data-check suite."""

    expectation: str  # e.g. "expect_column_values_to_be_between"
    column: str  # "" for table-level expectations; "a,b" for compound ones
    success: bool
    unexpected_fraction: float  # share of the checked rows that failed it (0..1)


@dataclass(frozen=True)
class QualityReport:
    """A site's latest data check (Great Expectations, run at the site)."""

    site_id: str
    success: bool
    score: float  # mean share of rows meeting each expectation (1.0: every row, every one)
    rows: int
    outcomes: tuple[ExpectationOutcome, ...]
    suite: str = ""  # suite name, with the schema fingerprint it was derived from

    @property
    def failed(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.success)

    def summary(self) -> str:
        """One line a human can act on: what failed and for what share of rows."""
        if self.success:
            return f"passed {len(self.outcomes)} expectations on {self.rows} rows"
        parts = [
            f"{o.expectation}({o.column or 'table'}): {o.unexpected_fraction:.1%} of rows"
            for o in self.failed
        ]
        return f"{len(self.failed)} of {len(self.outcomes)} expectations failed: " + "; ".join(
            parts
        )


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    column: str
    score: float  # the test's statistic: a p-value for tests, a distance for distances
    method: str  # e.g. "K-S p_value", "Wasserstein distance (normed)"
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftSummary:
    """A site's drift report of its current data window against its reference window
    (Evidently, run at the site). Without a reference (never trained), nothing can drift."""

    site_id: str
    has_reference: bool
    drifted_share: float  # share of columns that drifted
    dataset_drift: bool  # drifted_share >= drift_share_threshold
    drift_share_threshold: float
    features: tuple[FeatureDrift, ...] = ()
    reference_rows: int = 0
    current_rows: int = 0
    report_html: bytes = field(default=b"", repr=False)  # only when the site allows sharing it
    reference_round: str = ""  # the round whose training data is the reference window


@dataclass(frozen=True, slots=True)
class DriftTrigger:
    """Why one site calls for retraining: its data drifted, or the champion got worse there."""

    site_id: str
    kind: str  # "data_drift" or "performance_drift"
    score: float  # drifted share, or relative worsening of the metric
    threshold: float
    detail: str
    reference_round: str = ""


def data_drift_triggers(
    summaries: Mapping[str, DriftSummary],
    drift_share: float,
    per_site: Mapping[str, float] | None = None,
) -> list[DriftTrigger]:
    """Sites whose drifted share reaches their threshold (per site, else the global one).

    A site without a reference window (it never trained) or without a decision (windows too
    small) never triggers.
    """
    out = []
    for site_id in sorted(summaries):
        s = summaries[site_id]
        threshold = (per_site or {}).get(site_id, drift_share)
        if not s.has_reference or not s.features or s.drifted_share < threshold:
            continue
        columns = ", ".join(
            f"{f.column} ({f.method} {f.score:.3g})" for f in s.features if f.drifted
        )
        out.append(
            DriftTrigger(
                site_id,
                "data_drift",
                s.drifted_share,
                threshold,
                f"{s.drifted_share:.0%} of columns drifted: {columns}",
                s.reference_round,
            )
        )
    return out


def performance_triggers(
    now: Mapping[str, float],
    at_registration: Mapping[str, float],
    tolerance: float,
    metric: str = "loss",
    standard_errors: tuple[Mapping[str, float], Mapping[str, float]] | None = None,
    min_z: float = 3.0,
) -> list[DriftTrigger]:
    """Sites where the champion's `metric` (lower is better) worsened by more than `tolerance`
    (relative) since it was registered.

    With `standard_errors` (now, at registration), the worsening must also be significant:
    z = (now - then) / sqrt(se_now^2 + se_then^2) >= min_z, so a small site's sampling noise
    does not start a campaign.
    """
    out = []
    for site_id in sorted(set(now) & set(at_registration)):
        before, after = at_registration[site_id], now[site_id]
        change = (after - before) / max(abs(before), 1e-12)
        if standard_errors is not None:
            se_now, se_then = (se.get(site_id) for se in standard_errors)
            if se_now is not None and se_then is not None:
                spread = math.hypot(se_now, se_then)
                if spread > 0 and (after - before) / spread < min_z:
                    continue
        if change > tolerance:
            out.append(
                DriftTrigger(
                    site_id,
                    "performance_drift",
                    change,
                    tolerance,
                    f"{metric} {before:.4g} at registration, {after:.4g} now ({change:+.1%})",
                )
            )
    return out


def monitoring_values(per_site: Mapping[str, Mapping[str, float]], metric: str) -> dict[str, list]:
    """Per site: [the monitoring metric, its standard error or None when the task has none]."""
    return {s: [m[metric], m.get(f"{metric}_se")] for s, m in per_site.items() if metric in m}
