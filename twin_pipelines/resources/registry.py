"""The MLflow model registry: one MLflow run per round, one registered version per passing
candidate, aliases `challenger` (latest passing) and `champion` (best so far)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

CHAMPION, CHALLENGER = "champion", "challenger"
LOSS_TAG = "twin.pooled_loss"
SITE_LOSS_TAG = "twin.site_losses"


class ReviewRefused(Exception):
    """A review decision that governance does not allow (wrong state, policy not met)."""


@dataclass(frozen=True)
class ChampionInfo:
    version: str
    pooled_loss: float | None
    round_key: str | None
    site_losses: dict[str, float]  # per-site validation loss at registration
    schema_fingerprint: str = ""
    monitoring_metric: str = "loss"
    # that metric per site at registration, with its standard error (None if unknown)
    site_monitoring: dict[str, tuple[float, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredVersion:
    model_name: str
    version: str
    run_id: str
    run_url: str
    version_url: str
    promoted: bool


class MlflowRegistry(dg.ConfigurableResource):
    tracking_uri: str
    artifact_root: str = ""
    experiment: str = "twin-pipelines"
    model_name: str = "patient-twin"
    ui_url: str = "http://127.0.0.1:5000"

    def _client(self):
        import mlflow
        from mlflow import MlflowClient

        # The pickle format is chosen on purpose (it loads the model class); MLflow's advice to
        # use pt2 and its "created version" chatter are noise in a pipeline's log.
        logging.getLogger("mlflow").setLevel(logging.ERROR)

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _experiment_id(self, client) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = Path(self.artifact_root).resolve().as_uri() if self.artifact_root else None
        return client.create_experiment(self.experiment, artifact_location=location)

    def champion(self) -> ChampionInfo | None:
        from mlflow.exceptions import MlflowException

        client = self._client()
        try:
            mv = client.get_model_version_by_alias(self.model_name, CHAMPION)
        except MlflowException:
            return None
        loss = mv.tags.get(LOSS_TAG)
        site_losses = {s: float(v) for s, v in json.loads(mv.tags.get(SITE_LOSS_TAG, "{}")).items()}
        return ChampionInfo(
            str(mv.version),
            float(loss) if loss is not None else None,
            mv.tags.get("twin.round"),
            site_losses,
            mv.tags.get("twin.schema_fingerprint", ""),
            mv.tags.get("twin.monitoring_metric", "loss"),
            {s: tuple(v) for s, v in json.loads(mv.tags.get("twin.site_monitoring", "{}")).items()},
        )

    def review(self, version: str, decision: str, reviewer: str, note: str = "") -> str:
        """A reviewer's decision on a version pending review; returns its new status.

        Approval makes it champion only if the promotion policy still holds against the
        champion of now (which may have changed since registration). Raises ReviewRefused.
        """
        from twin_core.gates import decide_promotion

        client = self._client()
        mv = client.get_model_version(self.model_name, version)
        status = mv.tags.get("governance.status", "")
        if status != "pending_review":
            raise ReviewRefused(f"version {version} is {status or 'untracked'}, not pending review")
        if decision not in ("approve", "reject"):
            raise ReviewRefused(f"decision must be approve or reject, got {decision!r}")
        if not reviewer.strip():
            raise ReviewRefused("the reviewer must be named")
        if decision == "approve":
            champion = self.champion()
            verdict = decide_promotion(
                float(mv.tags[LOSS_TAG]),
                json.loads(mv.tags.get(SITE_LOSS_TAG, "{}")),
                champion.pooled_loss if champion else None,
                champion.site_losses if champion else {},
                gates_passed=True,
                site_tolerance=float(mv.tags.get("governance.site_tolerance", "0.05")),
            )
            if not verdict.promote:
                raise ReviewRefused(
                    f"version {version} cannot become champion: " + "; ".join(verdict.reasons)
                )
        new_status = "approved" if decision == "approve" else "rejected"
        tags = {
            "governance.status": new_status,
            "governance.reviewer": reviewer.strip(),
            "governance.note": note,
            "governance.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for key, value in tags.items():
            client.set_model_version_tag(self.model_name, version, key, value)
        if decision == "approve":
            client.set_registered_model_alias(self.model_name, CHAMPION, version)
        return new_status

    def log_monitoring(self, name: str, doc: dict) -> str:
        """Record a monitoring summary as a JSON artifact of a run in the experiment."""
        import mlflow

        client = self._client()
        experiment_id = self._experiment_id(client)
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=name, tags={"twin.kind": "monitoring"}
        ) as run:
            mlflow.log_dict(doc, f"{name}.json")
        return run.info.run_id

    def register_round(
        self,
        *,
        round_key: str,
        step: int,
        model,
        params: dict[str, object],
        metrics: dict[str, float],
        run_tags: dict[str, str],
        version_tags: dict[str, str],
        artifacts: dict[str, dict],
        description: str,
        promote: bool,
        files: dict[str, str] | None = None,  # local path -> artifact folder
    ) -> RegisteredVersion:
        """Log the round as an MLflow run, register its model, set the aliases."""
        import mlflow
        import mlflow.pytorch
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        import twin_core

        client = self._client()
        experiment_id = self._experiment_id(client)
        now = int(time.time() * 1000)
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=round_key, tags=run_tags
        ) as run:
            run_id = run.info.run_id
            client.log_batch(
                run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            )
            # the model before the metrics: log_model reads back the history of every metric
            # the run holds (one query each, hundreds with per-site metrics) to link them to it
            with _requirements_taken_as_met():
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    serialization_format="pickle",
                    pip_requirements=["torch==2.13.0", "numpy<3"],
                    code_paths=[str(Path(twin_core.__file__).parent)],
                )
            client.log_batch(
                run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
            )
            for name, doc in artifacts.items():
                mlflow.log_dict(doc, name)
            for path, folder in (files or {}).items():
                mlflow.log_artifact(path, artifact_path=folder)
        try:
            client.get_registered_model(self.model_name)
        except MlflowException:
            client.create_registered_model(
                self.model_name, description="Federated model trained by Twin Pipelines."
            )
        version = str(
            client.create_model_version(
                self.model_name,
                info.model_uri,
                run_id=run_id,
                tags=version_tags,
                description=description,
            ).version
        )
        client.set_registered_model_alias(self.model_name, CHALLENGER, version)
        if promote:
            client.set_registered_model_alias(self.model_name, CHAMPION, version)
        base = self.ui_url.rstrip("/")
        return RegisteredVersion(
            model_name=self.model_name,
            version=version,
            run_id=run_id,
            run_url=f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
            version_url=f"{base}/#/models/{self.model_name}/versions/{version}",
            promoted=promote,
        )


@contextmanager
def _requirements_taken_as_met() -> Iterator[None]:
    """Skip MLflow's check of the model's pip requirements against this environment while it
    logs the model. The requirements are the ones `register_round` pins (torch==2.13.0,
    numpy<3), which the process that built the model runs on; the check only ever warns, and
    to do so it scans every installed distribution: 0.3 s in each fresh process, which every
    round launched from the UI is (docs/benchmarks.md, benchmark 4)."""
    from mlflow.utils import environment

    original = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if original is None:  # another MLflow version: its own behaviour
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = original
