"""The synthetic cohort's ground truth, for evaluation only (bias of effect estimates)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg


class CohortTruth(dg.ConfigurableResource):
    """The generator's truth summary (`truth/summary.json`) of a synthetic cohort.

    Read by the twin's evaluation to report bias against the true treatment effect, and to
    draw synthetic patients for pictures; training never reads it. With real data there is no
    truth: leave `path` empty or pointing at no file.
    """

    path: str = ""

    def summary(self) -> dict | None:
        if not self.path:
            return None
        file = Path(self.path)
        if not file.is_file():
            return None
        try:
            doc = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"truth summary {file} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or "pooled" not in doc or "sites" not in doc:
            raise ValueError(f"{file} is not a cohort truth summary (no 'pooled' and 'sites')")
        return doc
