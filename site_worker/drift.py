"""Drift of a site's data: its current window against the reference window it was trained on.

Runs Evidently's ``DataDriftPreset`` at the site and keeps only aggregates: per column the test
or distance Evidently chose, its score, its threshold and its decision, plus row counts. Never a
value, a row index or an id. ``evidently`` is imported inside :func:`drift_summary` only (the
import costs seconds), so importing this module stays cheap.
"""

from __future__ import annotations

import pandas as pd

from twin_core.monitoring import DriftSummary, FeatureDrift
from twin_core.schema import DataSchema


def unit_table(schema: DataSchema, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per unit of analysis, holding the columns drift is measured on.

    Args:
        schema: The site's declared schema.
        frame: The site's table, already cleaned by ``check_frame``.

    Returns:
        For ``patient_twin``, each patient's baseline row (visit 0): the feature columns, the
        target (the baseline outcome) and the calendar column if declared (the enrolment day).
        For ``tabular``, the frame's feature and target columns (and calendar column if
        declared). The id column is never included. The index is reset.
    """
    columns = [f.name for f in schema.features] + [schema.target]
    if schema.calendar_column:
        columns.append(schema.calendar_column)
    rows = frame
    if schema.task == "patient_twin":
        rows = frame[frame[schema.visit_column] == 0]
    return rows[columns].reset_index(drop=True)


def window(
    schema: DataSchema,
    units: pd.DataFrame,
    *,
    until_day: float | None = None,
    days: float | None = None,
) -> pd.DataFrame:
    """The units whose calendar value falls in ``(until_day - days, until_day]``.

    Args:
        schema: The site's declared schema.
        units: A table from :func:`unit_table`.
        until_day: Upper bound, inclusive; ``None`` means no upper bound.
        days: Width of the window; ``None`` means no lower bound. With ``until_day`` None the
            window is the last ``days`` up to the table's largest calendar value.

    Returns:
        The selected rows (index kept). A schema without a calendar column, or an empty table,
        returns ``units`` unchanged.
    """
    cal = schema.calendar_column
    if not cal or units.empty:
        return units
    values = units[cal]
    upper = float(values.max()) if until_day is None else float(until_day)
    keep = values <= upper
    if days is not None:
        keep &= values > upper - float(days)
    return units[keep]


def _columns(schema: DataSchema) -> tuple[list[str], list[str]]:
    """Numerical and categorical columns compared for drift (the calendar column is not)."""
    numerical = [f.name for f in schema.numeric_features]
    categorical = [f.name for f in schema.categorical_features]
    if schema.task == "tabular" and schema.problem == "classification":
        categorical.append(schema.target)
    else:
        numerical.append(schema.target)
    return numerical, categorical


def _drifted_by_direction(method: str, score: float, threshold: float) -> bool:
    """Fallback decision when Evidently's own is absent: p-values drift below the threshold,
    distances at or above it."""
    return score < threshold if "p_value" in method else score >= threshold


def drift_summary(
    site_id: str,
    schema: DataSchema,
    reference: pd.DataFrame | None,
    current: pd.DataFrame,
    *,
    drift_share: float = 0.5,
    min_rows: int = 10,
    share_report: bool = False,
) -> DriftSummary:
    """Compare the current window of a site's units with its reference window.

    Uses Evidently's default test per column (for up to 1000 reference rows K-S on numerical
    columns with more than 5 distinct values, chi-square or Z-test otherwise; above that
    Wasserstein or Jensen-Shannon distances) and takes Evidently's per-column decision.

    Args:
        site_id: The site the summary is about.
        schema: The site's declared schema.
        reference: Reference units (from :func:`unit_table`), or None if the site has none yet.
        current: Current units (from :func:`unit_table`).
        drift_share: Share of drifted columns at which the dataset counts as drifted.
        min_rows: Fewest rows either side needs for a decision.
        share_report: Whether to include Evidently's full HTML report.

    Returns:
        A DriftSummary. Without a reference: ``has_reference`` False, nothing drifted. With
        fewer than ``min_rows`` rows on either side: ``has_reference`` True but no decision
        (``drifted_share`` 0, ``dataset_drift`` False, no features, no report), with the row
        counts filled in. Otherwise one FeatureDrift per compared column: the schema's features
        and the target (the calendar column is the window axis and is not compared; a column
        with no value at all on one side is skipped, and with none left there is no decision).
    """
    base = {"site_id": site_id, "drift_share_threshold": float(drift_share)}
    if reference is None:
        return DriftSummary(
            **base,
            has_reference=False,
            drifted_share=0.0,
            dataset_drift=False,
            current_rows=len(current),
        )
    counts = {"reference_rows": len(reference), "current_rows": len(current)}
    if min(len(reference), len(current)) < min_rows:
        return DriftSummary(
            **base, **counts, has_reference=True, drifted_share=0.0, dataset_drift=False
        )

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    # A column with no value at all on one side cannot be compared (Evidently raises); it is left
    # out here, and the data check (site_worker.quality) is what reports its missingness.
    def present(c: str) -> bool:
        return bool(reference[c].notna().any() and current[c].notna().any())

    numerical, categorical = ([c for c in group if present(c)] for group in _columns(schema))
    if not numerical + categorical:
        return DriftSummary(
            **base, **counts, has_reference=True, drifted_share=0.0, dataset_drift=False
        )
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    cols = numerical + categorical

    def dataset(units: pd.DataFrame) -> Dataset:
        return Dataset.from_pandas(units[cols].reset_index(drop=True), data_definition=definition)

    report = Report([DataDriftPreset(columns=cols, drift_share=drift_share)], include_tests=True)
    snapshot = report.run(dataset(current), dataset(reference))  # current first, then reference
    decisions = {
        t.metric_config.params.get("column"): t.status.value == "FAIL"
        for t in snapshot.tests_results
        if t.metric_config.params.get("type", "").endswith("ValueDrift")
    }
    features = []
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if not config["type"].endswith("ValueDrift"):
            continue
        column, method = str(config["column"]), str(config["method"])
        score, threshold = float(metric["value"]), float(config["threshold"])
        drifted = decisions.get(column)
        if drifted is None:
            drifted = _drifted_by_direction(method, score, threshold)
        features.append(FeatureDrift(column, score, method, threshold, bool(drifted)))
    share = sum(f.drifted for f in features) / len(features) if features else 0.0
    html = snapshot.get_html_str(as_iframe=False).encode("utf-8") if share_report else b""
    return DriftSummary(
        **base,
        **counts,
        has_reference=True,
        drifted_share=float(share),
        dataset_drift=bool(features) and share >= drift_share,
        features=tuple(features),
        report_html=html,
    )
