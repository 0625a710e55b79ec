"""The embedded default: everything lives under one project-local folder (`TWIN_HOME`).

.twin/
  dagster/            DAGSTER_HOME (SQLite run and event storage)
  mlflow/mlflow.db    MLflow tracking and registry (SQLite)
  mlflow/artifacts/   MLflow artifact root
  rounds/             round storage: plans, persisted updates, candidates
  cohort/             the synthetic demo cohort (site files, truth kept apart)
  sites/<site-id>/    each local site worker's state and log
  sites.yaml          the local fleet: site ids and their addresses
  pki/                with --tls: the federation CA and every party's certificate
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TwinHome:
    root: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TwinHome:
        env = os.environ if env is None else env
        return cls(Path(env.get("TWIN_HOME", ".twin")).resolve())

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    @property
    def cohort(self) -> Path:
        return self.root / "cohort"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def sites_file(self) -> Path:
        return self.root / "sites.yaml"

    def ensure_dagster_home(self) -> Path:
        """Create DAGSTER_HOME with an instance config suited to a local, private install."""
        home = self.dagster_home
        home.mkdir(parents=True, exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists():
            # runs launched from the UI start at once instead of waiting in the daemon's queue
            # (a few seconds per round: a campaign launches one run per round)
            config.write_text(
                "telemetry:\n  enabled: false\n"
                "nux:\n  enabled: false\n"
                "run_retries:\n  enabled: false\n"
                "run_coordinator:\n"
                "  module: dagster._core.run_coordinator\n"
                "  class: DefaultRunCoordinator\n"
                # Dagster's SQLite event log, its engines kept (twin_pipelines/dagster_storage.py)
                "event_log_storage:\n"
                "  module: twin_pipelines.dagster_storage\n"
                "  class: PooledSqliteEventLogStorage\n"
                "  config:\n"
                f"    base_dir: {json.dumps(str(home.resolve() / 'history' / 'runs'))}\n"
            )
        return home
