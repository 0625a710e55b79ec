"""Shared fixtures: the synthetic cohort on disk, site handlers, and a quiet environment."""

from __future__ import annotations

import os

for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SITES = ("site-1", "site-2", "site-3", "site-4")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from twin_core.cohort import CohortConfig, generate_cohort, write_cohort

    out = tmp_path_factory.mktemp("cohort")
    write_cohort(generate_cohort(CohortConfig(seed=7)), out)
    return out


@pytest.fixture(scope="session")
def twin_schema(cohort_dir: Path):
    from twin_core.schema import load_schema

    return load_schema(cohort_dir / "schema.yaml")


@pytest.fixture(scope="session")
def make_handler(cohort_dir: Path, twin_schema):
    """Build a real SiteHandler for a cohort site (its CSV read and checked like a worker does)."""
    from site_worker.data import load_file
    from site_worker.handler import SiteHandler

    def make(site_id: str) -> SiteHandler:
        schema, frame = load_file(
            cohort_dir / "sites" / f"{site_id}.csv", cohort_dir / "schema.yaml"
        )
        return SiteHandler(site_id, schema, frame)

    return make


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One SQLite MLflow store per session (creating one costs seconds); tests use their own
    registered-model names to stay apart."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"
