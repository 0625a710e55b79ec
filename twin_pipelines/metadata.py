"""Dagster metadata shapes used by the round assets: site tables and failure lists."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dagster as dg

from twin_core.federation import SiteFailure
from twin_core.gates import GateResult


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
