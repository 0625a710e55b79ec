from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from twin_pipelines.definitions import build_definitions
from twin_pipelines.resources import CohortTruth, MlflowRegistry, RoundStore


@dataclass
class RoundEnv:
    defs: dg.Definitions
    store: RoundStore
    registry: MlflowRegistry

    def versions(self):
        from mlflow import MlflowClient

        client = MlflowClient(
            tracking_uri=self.registry.tracking_uri, registry_uri=self.registry.tracking_uri
        )
        found = client.search_model_versions(f"name='{self.registry.model_name}'")
        return sorted(found, key=lambda v: int(v.version))

    def alias(self, name: str) -> str | None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(
            tracking_uri=self.registry.tracking_uri, registry_uri=self.registry.tracking_uri
        )
        try:
            return str(client.get_model_version_by_alias(self.registry.model_name, name).version)
        except MlflowException:
            return None


@pytest.fixture
def round_env(tmp_path: Path, mlflow_uri, request):
    """Definitions over a given fleet, with a fresh round store and a model name of this test."""
    uri, artifacts = mlflow_uri
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:60]

    def build(
        fleet, store_root: Path | None = None, name_suffix: str = "", truth: str = ""
    ) -> RoundEnv:
        store = RoundStore(root=str(store_root or tmp_path / "rounds"))
        registry = MlflowRegistry(
            tracking_uri=uri, artifact_root=str(artifacts), model_name=name + name_suffix
        )
        return RoundEnv(
            build_definitions(
                fleet=fleet, store=store, registry=registry, truth=CohortTruth(path=truth)
            ),
            store,
            registry,
        )

    return build


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst
