"""round_evaluation: the candidate evaluated at every compatible site, pooled from statistics."""

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import dagster as dg

from twin_core.dispatch import run_on_sites, split_failures
from twin_core.errors import SiteCallError
from twin_core.federation import Site, SiteEvaluation, SiteFailure
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


def _screened(task, results: Mapping[str, SiteEvaluation | SiteFailure]) -> dict:
    """The fan-out's results with every evaluation `_checked`: a malformed one becomes the
    site's failure, as if its call had raised."""
    out: dict[str, SiteEvaluation | SiteFailure] = {}
    for site_id, result in results.items():
        if isinstance(result, SiteEvaluation):
            try:
                result = _checked(task, result)
            except SiteCallError as exc:
                result = SiteFailure(site_id, "evaluate", exc.code, exc.message)
        out[site_id] = result
    return out


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
    weights = store.load(global_model.path).weights
    sites = fleet.sites()
    targets: dict[str, Site] = {s: sites[s] for s in round_plan.selection.compatible if s in sites}

    def evaluate(site: Site) -> SiteEvaluation:
        return site.evaluate(
            round_plan.round_key,
            round_plan.selection.schema_fingerprint,
            weights,
            config.eval_timeout_s,
        )

    # The sites evaluate first: their calls need neither the task nor the champion until the
    # replies are in. Meanwhile this thread resolves the task and reads the champion from
    # MLflow, which in a fresh process (every launched run) means importing torch and MLflow
    # and opening MLflow's store: seconds of first use, now spent while the sites compute
    # instead of after them. A champion lookup that fails is raised where it was before, once
    # the evaluation is recorded. Not waited for if this step is interrupted (as run_on_sites
    # does not wait for its calls): a terminated run must not hang on the sites.
    fanout = ThreadPoolExecutor(1, thread_name_prefix="evaluate-fanout")
    try:
        calls = fanout.submit(
            run_on_sites, targets, evaluate, stage="evaluate", timeout=config.eval_timeout_s + 10
        )
        task = task_for(parse_schema(round_plan.schema))
        try:
            champion, champion_error = registry.champion(), None
        except Exception as exc:  # re-raised below, once the evaluation is recorded
            champion, champion_error = None, exc
        results = _screened(task, calls.result())
    finally:
        fanout.shutdown(wait=False)
    evaluations, failure_list = split_failures(results)
    failures = tuple(failure_list)
    if not evaluations:
        raise dg.Failure(f"no site could evaluate the candidate: {failure_lines(failures)}")
    evaluation = replace(pool_evaluations(task, evaluations), failures=failures)
    store.write_json(round_plan.round_key, "evaluation.json", asdict(evaluation))
    if champion_error is not None:
        raise champion_error
    gate = regression_gate(
        evaluation.pooled["loss"],
        champion.pooled_loss if champion else None,
        config.regression_tolerance,
    )
    champion_loss = champion.pooled_loss if champion else None
    yield dg.Output(evaluation, metadata=evaluation_metadata(evaluation, champion_loss))
    yield check_result(gate)
