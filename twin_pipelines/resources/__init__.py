"""Resources: the site fleet, the round store and the model registry."""

from twin_pipelines.resources.fleet import Fleet, GrpcFleet, InProcessFleet
from twin_pipelines.resources.policy import DriftPolicy
from twin_pipelines.resources.registry import MlflowRegistry
from twin_pipelines.resources.store import RoundStore
from twin_pipelines.resources.truth import CohortTruth

__all__ = [
    "CohortTruth",
    "DriftPolicy",
    "Fleet",
    "GrpcFleet",
    "InProcessFleet",
    "MlflowRegistry",
    "RoundStore",
]
