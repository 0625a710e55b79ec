"""Dagster metadata shapes used by the round assets: site tables and failure lists."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import dagster as dg

from twin_core.federation import SiteFailure
from twin_core.gates import GateResult
from twin_core.monitoring import DriftSummary, FeatureDrift
from twin_core.rounds import RoundEvaluation, RoundPlan, RoundUpdates


def table(columns: Sequence[tuple[str, str]], rows: Iterable[dict]) -> dg.TableMetadataValue:
    """A UI table; `columns` are (name, type) with type in string/int/float/bool."""
    schema = dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in columns])
    records = [dg.TableRecord({n: r.get(n) for n, _ in columns}) for r in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def failure_lines(failures: Iterable[SiteFailure]) -> str:
    return "; ".join(f"{f.site_id}: {f.code}: {f.reason}" for f in failures)


def check_result(gate: GateResult, description: str | None = None) -> dg.AssetCheckResult:
    """A blocking check's result from a gate: ERROR severity, the gate's facts as metadata."""
    return dg.AssetCheckResult(
        check_name=gate.name,
        passed=gate.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description or gate.detail,
        metadata={k: float(v) for k, v in gate.facts.items()},
    )


def plan_metadata(plan: RoundPlan, seed: int) -> dict:
    selection = plan.selection
    return {
        "sites": table(
            [
                ("site", "string"),
                ("chosen", "bool"),
                ("reason", "string"),
                ("train_examples", "int"),
            ],
            (
                {
                    "site": d.site_id,
                    "chosen": d.chosen,
                    "reason": d.reason,
                    "train_examples": d.examples,
                }
                for d in selection.decisions
            ),
        ),
        "chosen_sites": len(selection.chosen),
        "skipped_sites": len(selection.decisions) - len(selection.chosen),
        "schema_fingerprint": selection.schema_fingerprint or "",
        "starts_from": plan.start_round or f"seeded initialisation (seed {seed})",
    }


def updates_metadata(updates: RoundUpdates) -> dict:
    rows = [
        {
            "site": u.site_id,
            "status": "ok",
            "examples": u.num_examples,
            "steps": u.steps,
            "train_loss": u.metrics.get("train_loss"),
            "seconds": round(u.train_seconds, 3),
            "delta_norm": None if math.isnan(u.delta_norm) else u.delta_norm,  # NaN: masked
            "wire_bytes": u.wire_bytes or None,  # 0: not measured (masked)
            "compression_ratio": (
                round(u.model_bytes / u.wire_bytes, 3) if u.wire_bytes and u.model_bytes else None
            ),
        }
        for u in updates.updates
    ]
    rows += [{"site": f.site_id, "status": f"{f.code}: {f.reason}"} for f in updates.failures]
    columns = [
        ("site", "string"),
        ("status", "string"),
        ("examples", "int"),
        ("steps", "int"),
        ("train_loss", "float"),
        ("seconds", "float"),
        ("delta_norm", "float"),
        ("wire_bytes", "int"),
        ("compression_ratio", "float"),
    ]
    return {
        "sites": table(columns, sorted(rows, key=lambda r: r["site"])),
        "succeeded": len(updates.updates),
        "failed": len(updates.failures),
        "total_examples": updates.total_examples,
        **wire_metadata(updates),
        **(
            {"secure_aggregation": "on: the orchestrator holds only the sum"}
            if updates.secure_sum_path
            else {}
        ),
    }


def wire_metadata(updates: RoundUpdates) -> dict:
    """Bytes of the updates on the wire (their tensors, compressed or not), what the same
    updates take uncompressed, and the ratio (uncompressed / on the wire): numbers, so the UI
    charts them across rounds. Empty where nothing was measured (secure aggregation)."""
    measured = [u for u in updates.updates if u.wire_bytes and u.model_bytes]
    if not measured:
        return {}
    wire = sum(u.wire_bytes for u in measured)
    model = sum(u.model_bytes for u in measured)
    return {
        "bytes_on_wire": dg.MetadataValue.int(wire),
        "uncompressed_bytes": dg.MetadataValue.int(model),
        "compression_ratio": dg.MetadataValue.float(round(model / wire, 4)),
    }


def evaluation_metadata(evaluation: RoundEvaluation, champion_loss: float | None) -> dict:
    """Pooled metrics as numbers (Dagster charts them across rounds) and a per-site table."""
    rows = [
        {"site": s, "examples": evaluation.examples[s], **m} for s, m in evaluation.per_site.items()
    ]
    rows += [{"site": f.site_id, "error": f"{f.code}: {f.reason}"} for f in evaluation.failures]
    columns = (
        [("site", "string"), ("examples", "int")]
        + [(k, "float") for k in sorted(evaluation.pooled)]
        + [("error", "string")]
    )
    return {
        **{f"pooled_{k}": dg.MetadataValue.float(float(v)) for k, v in evaluation.pooled.items()},
        "sites": table(columns, sorted(rows, key=lambda r: r["site"])),
        "evaluated_sites": len(evaluation.per_site),
        "champion_pooled_loss": dg.MetadataValue.text("no champion yet")
        if champion_loss is None
        else champion_loss,
    }


def quality_metadata(reports: dict, failures: list[SiteFailure]) -> dict:
    rows = [
        {
            "site": s,
            "passed": r.success,
            "score": round(r.score, 4),
            "rows": r.rows,
            "failed": "; ".join(
                f"{o.expectation}({o.column}): {o.unexpected_fraction:.1%}" for o in r.failed
            ),
        }
        for s, r in sorted(reports.items())
    ]
    rows += [{"site": f.site_id, "failed": f"unreachable: {f.code}: {f.reason}"} for f in failures]
    columns = [
        ("site", "string"),
        ("passed", "bool"),
        ("score", "float"),
        ("rows", "int"),
        ("failed", "string"),
    ]
    return {
        "sites": table(columns, rows),
        "sites_passing": sum(r.success for r in reports.values()),
        "sites_failing": sum(not r.success for r in reports.values()) + len(failures),
        "min_score": min((r.score for r in reports.values()), default=0.0),
    }


def drift_summaries_json(summaries: dict) -> dict:
    """What the drift sensor reads back: per site, the decision and the drifted columns."""
    return {
        s: {
            "has_reference": d.has_reference,
            "drifted_share": d.drifted_share,
            "dataset_drift": d.dataset_drift,
            "reference_round": d.reference_round,
            "reference_rows": d.reference_rows,
            "current_rows": d.current_rows,
            "features": [[f.column, f.score, f.method, f.threshold, f.drifted] for f in d.features],
        }
        for s, d in sorted(summaries.items())
    }


def summaries_from_json(doc: dict) -> dict[str, DriftSummary]:
    """The inverse of `drift_summaries_json` (drift thresholds of the site are not needed)."""
    return {
        s: DriftSummary(
            s,
            d["has_reference"],
            d["drifted_share"],
            d["dataset_drift"],
            0.0,
            tuple(FeatureDrift(*f) for f in d["features"]),
            d["reference_rows"],
            d["current_rows"],
            reference_round=d["reference_round"],
        )
        for s, d in doc.items()
    }


def drift_metadata(summaries: dict, failures: list[SiteFailure]) -> dict:
    rows = [
        {
            "site": s,
            "reference": d.reference_round or ("yes" if d.has_reference else "none yet"),
            "drifted_share": round(d.drifted_share, 4),
            "dataset_drift": d.dataset_drift,
            "windows": f"{d.reference_rows} / {d.current_rows}",
            "drifted": ", ".join(f"{f.column} ({f.score:.3g})" for f in d.features if f.drifted),
        }
        for s, d in sorted(summaries.items())
    ]
    rows += [{"site": f.site_id, "drifted": f"unreachable: {f.code}: {f.reason}"} for f in failures]
    columns = [
        ("site", "string"),
        ("reference", "string"),
        ("drifted_share", "float"),
        ("dataset_drift", "bool"),
        ("windows", "string"),
        ("drifted", "string"),
    ]
    return {
        "sites": table(columns, rows),
        "summaries": dg.MetadataValue.json(drift_summaries_json(summaries)),
        "max_drifted_share": max((d.drifted_share for d in summaries.values()), default=0.0),
        "sites_drifting": sum(d.dataset_drift for d in summaries.values()),
    }


def performance_metadata(doc: dict, failures: list[SiteFailure]) -> dict:
    """The champion's monitoring metric per site, at registration and now."""
    before = {s: v[0] for s, v in doc["at_registration"].items()}
    now = {s: v[0] for s, v in doc["now"].items()}
    rows = [
        {
            "site": s,
            "at_registration": before.get(s),
            "now": now.get(s),
            "change": (now[s] - before[s]) / max(abs(before[s]), 1e-12)
            if s in now and s in before
            else None,
        }
        for s in sorted(set(before) | set(now))
    ]
    columns = [
        ("site", "string"),
        ("at_registration", "float"),
        ("now", "float"),
        ("change", "float"),
    ]
    return {
        "champion_version": doc["version"],
        "metric": doc["metric"],
        "sites": table(columns, rows),
        "performance": dg.MetadataValue.json(
            {"metric": doc["metric"], "now": doc["now"], "at_registration": doc["at_registration"]}
        ),
        "unreachable": len(failures),
    }


def twin_metadata(report, figures: dict[str, str]) -> dict:
    """The twin's fitness for trial simulation: headline numbers (charted across rounds),
    horizon and effect tables, per-site error against the oracle, and inline figures."""
    horizons = table(
        [
            ("horizon", "int"),
            ("mae", "float"),
            ("rmse", "float"),
            ("coverage90", "float"),
            ("naive_mae", "float"),
            ("oracle_mae", "float"),
            ("oracle_coverage90", "float"),
            ("mae_vs_oracle", "float"),
            ("baseline_mae", "float"),
            ("oracle_baseline_mae", "float"),
        ],
        [
            {
                "horizon": r.horizon,
                "mae": r.mae,
                "rmse": r.rmse,
                "coverage90": r.coverage90,
                "naive_mae": r.naive_mae,
                "oracle_mae": r.oracle_mae,
                "oracle_coverage90": r.oracle_coverage90,
                "mae_vs_oracle": r.vs_oracle,
                "baseline_mae": r.baseline_mae,
                "oracle_baseline_mae": r.oracle_baseline_mae,
            }
            for r in report.horizons
        ],
    )
    effect_rows = [
        {
            "scope": scope,
            "method": e.method,
            "estimate": e.estimate,
            "se": e.se,
            "ci95_low": e.ci95[0],
            "ci95_high": e.ci95[1],
            "truth": e.truth,
            "bias": e.bias,
            "covers_truth": "" if e.covers_truth is None else str(e.covers_truth).lower(),
        }
        for scope, effects in [("pooled", report.effects), *sorted(report.site_effects.items())]
        for e in effects
    ]
    effects = table(
        [
            ("scope", "string"),
            ("method", "string"),
            ("estimate", "float"),
            ("se", "float"),
            ("ci95_low", "float"),
            ("ci95_high", "float"),
            ("truth", "float"),
            ("bias", "float"),
            ("covers_truth", "string"),
        ],
        effect_rows,
    )
    out: dict = {
        **{k: dg.MetadataValue.float(v) for k, v in report.headline().items()},
        "horizons": horizons,
        "treatment_effects": effects,
        "ground_truth": "synthetic cohort truth (evaluation only)"
        if report.truth_known
        else "none (no bias against truth)",
    }
    if report.site_vs_oracle:
        out["site_mae_h1_vs_oracle"] = dg.MetadataValue.json(report.site_vs_oracle)
    for name, markdown in figures.items():
        out[name] = dg.MetadataValue.md(markdown)
    return out
