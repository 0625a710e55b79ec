"""The assets of one federated round, in order: plan, updates, model, evaluation, the twin's
fitness for trial simulation, registration."""

from twin_pipelines.assets.evaluation import round_evaluation
from twin_pipelines.assets.registry import registered_model
from twin_pipelines.assets.rounds import global_model, round_plan, site_updates
from twin_pipelines.assets.twin import twin_evaluation

ROUND_GROUP = "fl_round"
ROUND_ASSETS = [
    round_plan,
    site_updates,
    global_model,
    round_evaluation,
    twin_evaluation,
    registered_model,
]

__all__ = [
    "ROUND_ASSETS",
    "ROUND_GROUP",
    "global_model",
    "registered_model",
    "round_evaluation",
    "round_plan",
    "site_updates",
    "twin_evaluation",
]
