"""The assets of one federated round, in order: plan, updates, model, evaluation, registration."""

from twin_pipelines.assets.evaluation import round_evaluation
from twin_pipelines.assets.registry import registered_model
from twin_pipelines.assets.rounds import global_model, round_plan, site_updates

ROUND_GROUP = "fl_round"
ROUND_ASSETS = [round_plan, site_updates, global_model, round_evaluation, registered_model]

__all__ = [
    "ROUND_ASSETS",
    "ROUND_GROUP",
    "global_model",
    "registered_model",
    "round_evaluation",
    "round_plan",
    "site_updates",
]
