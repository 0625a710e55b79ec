"""The Dagster code location (workspace.yaml points here).

Resources come from the environment, with the embedded default under TWIN_HOME (.twin/):
  TWIN_SITES          "site-1=host:port,..." (else TWIN_SITES_FILE, default .twin/sites.yaml)
  MLFLOW_TRACKING_URI (default: SQLite under .twin/mlflow)
  TWIN_MODEL_NAME     registered model name (default patient-twin)
  TWIN_MLFLOW_UI      base URL of the MLflow UI, for links (default http://127.0.0.1:5000)
  TWIN_DRIFT_SHARE    share of a site's columns whose drift starts retraining (default 0.5)
  TWIN_SITE_DRIFT_SHARE  per-site overrides, "site-1=0.75,site-3=0.5"
  TWIN_PERFORMANCE_TOLERANCE  relative worsening of the champion at a site that does (0.10)
  TWIN_TLS_DIR        the federation's PKI folder (twin pki init): mutual TLS to every site
  TWIN_INSECURE       1: plaintext channels, local/dev mode only (the demo's default)
  TWIN_TRUTH          a synthetic cohort's truth/summary.json, read by evaluation only
                      (default .twin/cohort/truth/summary.json if present; "" for none)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from twin_pipelines.assets import ROUND_ASSETS
from twin_pipelines.assets.monitoring import MONITORING_ASSETS
from twin_pipelines.home import TwinHome
from twin_pipelines.jobs import fl_campaign_job, fl_round_job, monitoring_job, review_job
from twin_pipelines.resources import (
    CohortTruth,
    DriftPolicy,
    Fleet,
    GrpcFleet,
    MlflowRegistry,
    RoundStore,
)
from twin_pipelines.resources.outputs import AssetValueFiles
from twin_pipelines.resources.policy import parse_site_thresholds
from twin_pipelines.schedules import improvement_schedule, monitoring_schedule
from twin_pipelines.sensors import campaign_sensor, drift_sensor


def build_definitions(
    *,
    fleet: Fleet,
    store: RoundStore,
    registry: MlflowRegistry,
    drift_policy: DriftPolicy | None = None,
    truth: CohortTruth | None = None,
) -> dg.Definitions:
    return dg.Definitions(
        assets=ROUND_ASSETS + MONITORING_ASSETS,
        jobs=[fl_round_job, fl_campaign_job, monitoring_job, review_job],
        sensors=[campaign_sensor, drift_sensor],
        schedules=[monitoring_schedule, improvement_schedule],
        resources={
            "fleet": fleet,
            "store": store,
            "registry": registry,
            "drift_policy": drift_policy or DriftPolicy(),
            "truth": truth or CohortTruth(),
            "io_manager": AssetValueFiles(),
        },
    )


def resources_from_env(env: Mapping[str, str] | None = None) -> dict:
    env = os.environ if env is None else env
    home = TwinHome.from_env(env)
    return {
        "fleet": GrpcFleet(
            endpoints=env.get("TWIN_SITES", ""),
            sites_file=env.get("TWIN_SITES_FILE", str(home.sites_file)),
            tls_dir=env.get("TWIN_TLS_DIR", ""),
            insecure=env.get("TWIN_INSECURE", "").lower() in ("1", "true", "yes"),
        ),
        "store": RoundStore(root=str(home.rounds)),
        "registry": MlflowRegistry(
            tracking_uri=env.get("MLFLOW_TRACKING_URI", home.tracking_uri),
            artifact_root=str(home.artifact_root),
            model_name=env.get("TWIN_MODEL_NAME", "patient-twin"),
            ui_url=env.get("TWIN_MLFLOW_UI", "http://127.0.0.1:5000"),
        ),
        "drift_policy": DriftPolicy(
            drift_share=float(env.get("TWIN_DRIFT_SHARE", "0.5")),
            site_drift_share=parse_site_thresholds(env.get("TWIN_SITE_DRIFT_SHARE", "")),
            performance_tolerance=float(env.get("TWIN_PERFORMANCE_TOLERANCE", "0.10")),
        ),
        "truth": CohortTruth(
            path=env.get("TWIN_TRUTH", str(home.cohort / "truth" / "summary.json"))
        ),
    }


defs = build_definitions(**resources_from_env())
