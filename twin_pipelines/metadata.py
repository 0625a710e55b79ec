"""Dagster metadata shapes used by the round assets: site tables and failure lists."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dagster as dg

from twin_core.federation import SiteFailure


def table(columns: Sequence[tuple[str, str]], rows: Iterable[dict]) -> dg.TableMetadataValue:
    """A UI table; `columns` are (name, type) with type in string/int/float/bool."""
    schema = dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in columns])
    records = [dg.TableRecord({n: r.get(n) for n, _ in columns}) for r in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def failure_lines(failures: Iterable[SiteFailure]) -> str:
    return "; ".join(f"{f.site_id}: {f.code}: {f.reason}" for f in failures)
