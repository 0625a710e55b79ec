"""When drift at a site is enough to retrain: thresholds, global and per site."""

import dagster as dg


class DriftPolicy(dg.ConfigurableResource):
    """Thresholds of the drift sensor.

    drift_share: share of a site's columns that must drift (Evidently, at the site).
    site_drift_share: per-site overrides, e.g. {"site-1": 0.75} for a small, noisy site.
    performance_tolerance: relative worsening of the champion's loss at a site since registration.
    campaign_rounds: rounds of the retraining campaign a trigger starts.
    """

    drift_share: float = 0.5
    site_drift_share: dict[str, float] = {}
    performance_tolerance: float = 0.10
    campaign_rounds: int = 3


def parse_site_thresholds(text: str) -> dict[str, float]:
    """ "site-1=0.75,site-3=0.5" -> {"site-1": 0.75, "site-3": 0.5}"""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        site, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad per-site threshold {item!r}: expected site-id=share")
        out[site.strip()] = float(value)
    return out
