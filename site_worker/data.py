"""Where a site's data comes from: a CSV/Parquet file with a declared schema, or the
seeded synthetic cohort. The only module of the worker that reads patient data."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from twin_core.errors import SiteDataError
from twin_core.schema import DataSchema, check_frame, load_schema, parse_schema, read_table


def load_file(data_path: Path, schema_path: Path) -> tuple[DataSchema, pd.DataFrame]:
    """Read and check a site's file against its schema; SchemaError/SiteDataError if unfit."""
    schema = load_schema(schema_path)
    frame = read_table(data_path)
    try:
        return schema, check_frame(schema, frame)
    except SiteDataError as exc:
        raise SiteDataError(f"{data_path}: {exc}") from None


def synthetic_cohort(seed: int, drift: tuple[str, ...] = (), n_sites: int = 0):
    """The seeded synthetic cohort: the default five sites, or `n_sites` simulated ones
    (twin_core.cohort.simulated_sites). Cached: a worker hosting many virtual sites generates
    it once, not once per site."""
    return _cohort(int(seed), tuple(drift), int(n_sites))


@functools.lru_cache(maxsize=2)
def _cohort(seed: int, drift: tuple[str, ...], n_sites: int):
    from twin_core.cohort import CohortConfig, DriftSpec, generate_cohort, simulated_sites

    sites = {"sites": simulated_sites(n_sites)} if n_sites else {}
    return generate_cohort(
        CohortConfig(seed=seed, drift=tuple(DriftSpec.parse(d) for d in drift), **sites)
    )


def load_synthetic(
    site_id: str, seed: int, drift: tuple[str, ...] = (), n_sites: int = 0
) -> tuple[DataSchema, pd.DataFrame]:
    """One site's share of the seeded synthetic cohort (reference/twin-model.md)."""
    from twin_core.cohort import TrajectoryParams, cohort_schema

    cohort = synthetic_cohort(seed, drift, n_sites)
    try:
        frame = cohort.site(site_id)
    except KeyError as exc:
        raise SiteDataError(str(exc.args[0] if exc.args else exc)) from None
    params = TrajectoryParams(**cohort.summary["params"])
    schema = parse_schema(cohort_schema(params), source="synthetic cohort schema")
    return schema, check_frame(schema, frame)


class FileSource:
    """A site's data file and its schema, re-read when the file changes (new rows arrive)."""

    def __init__(self, data_path: Path, schema_path: Path) -> None:
        self.data_path, self.schema_path = Path(data_path), Path(schema_path)

    def version(self) -> tuple:
        stats = [p.stat() for p in (self.data_path, self.schema_path)]
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def load(self) -> tuple[DataSchema, pd.DataFrame]:
        return load_file(self.data_path, self.schema_path)


class SyntheticSource:
    """One site's share of the seeded synthetic cohort (it never changes)."""

    def __init__(
        self, site_id: str, seed: int, drift: tuple[str, ...] = (), n_sites: int = 0
    ) -> None:
        self.site_id, self.seed, self.drift, self.n_sites = site_id, seed, drift, n_sites

    def version(self) -> tuple:
        return (self.site_id, self.seed, self.drift, self.n_sites)

    def load(self) -> tuple[DataSchema, pd.DataFrame]:
        return load_synthetic(self.site_id, self.seed, self.drift, self.n_sites)
