"""round_evaluation: the candidate evaluated at every compatible site, pooled from statistics."""

import math
from dataclasses import asdict, replace

import dagster as dg

from twin_core.dispatch import run_on_sites, split_failures
from twin_core.errors import SiteCallError
from twin_core.federation import Site, SiteEvaluation
from twin_core.gates import regression_gate
from twin_core.rounds import Candidate, RoundPlan, pool_evaluations
from twin_core.schema import parse_schema
from twin_pipelines.config import RoundConfig
from twin_pipelines.metadata import check_result, evaluation_metadata, failure_lines
from twin_pipelines.partitions import fl_round
from twin_pipelines.resources import Fleet, MlflowRegistry, RoundStore


def _checked(task, evaluation: SiteEvaluation) -> SiteEvaluation:
    """Accept only the task's declared statistics, all finite: nothing else may come back."""
    names = set(evaluation.statistics)
    if names != set(task.statistic_names):
        raise SiteCallError(
            evaluation.site_id,
            "MALFORMED_REPLY",
            f"statistics {sorted(names)} are not the task's {sorted(task.statistic_names)}",
        )
    if not all(math.isfinite(v) for v in evaluation.statistics.values()):
        raise SiteCallError(evaluation.site_id, "MALFORMED_REPLY", "non-finite statistics")
    return evaluation


@dg.asset(
    partitions_def=fl_round,
    group_name="fl_round",
    kinds={"python"},
    check_specs=[
        dg.AssetCheckSpec(
            "no_pooled_regression",
            asset="round_evaluation",
            blocking=True,
            description="pooled loss not worse than the champion's beyond tolerance",
        )
    ],
)
def round_evaluation(
    context: dg.AssetExecutionContext,
    round_plan: RoundPlan,
    global_model: Candidate,
    fleet: dg.ResourceParam[Fleet],
    store: RoundStore,
    registry: MlflowRegistry,
):
    """Federated evaluation of the candidate on each compatible site's holdout split."""
    from twin_core.tasks import task_for

    config = RoundConfig(**round_plan.config)
    task = task_for(parse_schema(round_plan.schema))
    weights = store.load(global_model.path).weights
    sites = fleet.sites()
    targets: dict[str, Site] = {s: sites[s] for s in round_plan.selection.compatible if s in sites}

    def evaluate(site: Site) -> SiteEvaluation:
        return _checked(
            task,
            site.evaluate(
                round_plan.round_key,
                round_plan.selection.schema_fingerprint,
                weights,
                config.eval_timeout_s,
            ),
        )

    results = run_on_sites(targets, evaluate, stage="evaluate", timeout=config.eval_timeout_s + 10)
    evaluations, failure_list = split_failures(results)
    failures = tuple(failure_list)
    if not evaluations:
        raise dg.Failure(f"no site could evaluate the candidate: {failure_lines(failures)}")
    evaluation = replace(pool_evaluations(task, evaluations), failures=failures)
    store.write_json(round_plan.round_key, "evaluation.json", asdict(evaluation))
    champion = registry.champion()
    gate = regression_gate(
        evaluation.pooled["loss"],
        champion.pooled_loss if champion else None,
        config.regression_tolerance,
    )
    champion_loss = champion.pooled_loss if champion else None
    yield dg.Output(evaluation, metadata=evaluation_metadata(evaluation, champion_loss))
    yield check_result(gate)
