"""Dagster metadata shapes used by the round assets: site tables and failure lists."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dagster as dg

from twin_core.federation import SiteFailure
from twin_core.gates import GateResult
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
            "delta_norm": u.delta_norm,
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
    ]
    return {
        "sites": table(columns, sorted(rows, key=lambda r: r["site"])),
        "succeeded": len(updates.updates),
        "failed": len(updates.failures),
        "total_examples": updates.total_examples,
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
