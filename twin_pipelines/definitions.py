"""The Dagster code location (workspace.yaml points here).

Resources come from the environment, with the embedded default under TWIN_HOME (.twin/):
  TWIN_SITES          "site-1=host:port,..." (else TWIN_SITES_FILE, default .twin/sites.yaml)
  MLFLOW_TRACKING_URI (default: SQLite under .twin/mlflow)
  TWIN_MODEL_NAME     registered model name (default patient-twin)
  TWIN_MLFLOW_UI      base URL of the MLflow UI, for links (default http://127.0.0.1:5000)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from twin_pipelines.assets import ROUND_ASSETS
from twin_pipelines.home import TwinHome
from twin_pipelines.jobs import fl_campaign_job, fl_round_job
from twin_pipelines.resources import Fleet, GrpcFleet, MlflowRegistry, RoundStore
from twin_pipelines.sensors import campaign_sensor


def build_definitions(
    *, fleet: Fleet, store: RoundStore, registry: MlflowRegistry
) -> dg.Definitions:
    return dg.Definitions(
        assets=ROUND_ASSETS,
        jobs=[fl_round_job, fl_campaign_job],
        sensors=[campaign_sensor],
        resources={"fleet": fleet, "store": store, "registry": registry},
    )


def resources_from_env(env: Mapping[str, str] | None = None) -> dict:
    env = os.environ if env is None else env
    home = TwinHome.from_env(env)
    return {
        "fleet": GrpcFleet(
            endpoints=env.get("TWIN_SITES", ""),
            sites_file=env.get("TWIN_SITES_FILE", str(home.sites_file)),
        ),
        "store": RoundStore(root=str(home.rounds)),
        "registry": MlflowRegistry(
            tracking_uri=env.get("MLFLOW_TRACKING_URI", home.tracking_uri),
            artifact_root=str(home.artifact_root),
            model_name=env.get("TWIN_MODEL_NAME", "patient-twin"),
            ui_url=env.get("TWIN_MLFLOW_UI", "http://127.0.0.1:5000"),
        ),
    }


defs = build_definitions(**resources_from_env())
