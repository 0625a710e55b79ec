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
        """Create DAGSTER_HOME with an instance config suited to a local, private install (a
        config an earlier version wrote, unedited, is brought up to date; any other is kept)."""
        home = self.dagster_home
        home.mkdir(parents=True, exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists() or config.read_text() in _EARLIER_INSTANCE_CONFIGS:
            config.write_text(_instance_config(home))
        return home


_BASE_CONFIG = (
    "telemetry:\n  enabled: false\nnux:\n  enabled: false\nrun_retries:\n  enabled: false\n"
)
# runs launched from the UI start at once instead of waiting in the daemon's queue (a few
# seconds per round: a campaign launches one run per round)
_RUN_COORDINATOR = (
    "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
)
# what earlier versions wrote into a new DAGSTER_HOME
_EARLIER_INSTANCE_CONFIGS = (_BASE_CONFIG, _BASE_CONFIG + _RUN_COORDINATOR)


def _instance_config(home: Path) -> str:
    # Dagster's SQLite event log in its default place, its engines kept (a round costs about
    # 0.2 s less: twin_pipelines/dagster_storage.py)
    runs = json.dumps(str(home.resolve() / "history" / "runs"))
    return (
        _BASE_CONFIG
        + _RUN_COORDINATOR
        + "event_log_storage:\n"
        + "  module: twin_pipelines.dagster_storage\n"
        + "  class: PooledSqliteEventLogStorage\n"
        + f"  config:\n    base_dir: {runs}\n"
    )
