"""Run rounds one after another in this process, each a real Dagster run of the round job.

This is how the demo and the tests drive a campaign: no daemon, no process per run, the same
assets, instance and run records the UI shows. (From the UI, the campaign sensor chains rounds.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg

from twin_pipelines.config import RoundConfig
from twin_pipelines.jobs import ROUND_JOB
from twin_pipelines.partitions import fl_round, next_round_key
from twin_pipelines.sensors import DRIVER_TAG, campaign_tags
from twin_pipelines.sqlite_sync import fewer_fsyncs


@dataclass(frozen=True)
class RoundResult:
    round_key: str
    run_id: str
    success: bool
    pooled: dict[str, float] = field(default_factory=dict)
    sites: tuple[str, ...] = ()
    failed_sites: tuple[str, ...] = ()
    registered: dict = field(default_factory=dict)
    error: str = ""


def _output(result: dg.ExecuteInProcessResult, node: str):
    try:
        return result.output_for_node(node)
    except dg.DagsterInvariantViolationError:  # the step did not run in this (failed) run
        return None


def _error(result: dg.ExecuteInProcessResult) -> str:
    """Why the run failed, in words: each failed step's root cause and each failed check."""
    messages = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            messages.append(f"{event.step_key}: {' '.join(error.message.split())}")
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            messages.append(f"check {evaluation.check_name} failed: {evaluation.description}")
    return "; ".join(messages) or "run failed"


def run_round(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    config: RoundConfig,
    tags: dict[str, str] | None = None,
    round_key: str | None = None,
    log_level: str = "INFO",
) -> RoundResult:
    """One round as one Dagster run (in this process) on a new `fl_round` partition."""
    key = round_key or next_round_key(instance)
    instance.add_dynamic_partitions(fl_round.name, [key])
    with fewer_fsyncs():  # the on-disk SQLite instance: an fsync per event otherwise
        result = defs.resolve_job_def(ROUND_JOB).execute_in_process(
            instance=instance,
            partition_key=key,
            run_config={
                "ops": {"round_plan": {"config": config.model_dump()}},
                "loggers": {"console": {"config": {"log_level": log_level}}},
            },
            tags=tags or {},
            raise_on_error=False,
        )
    updates = _output(result, "site_updates")
    evaluation = _output(result, "round_evaluation")
    return RoundResult(
        round_key=key,
        run_id=result.run_id,
        success=result.success,
        pooled=dict(evaluation.pooled) if evaluation else {},
        sites=tuple(u.site_id for u in updates.updates) if updates else (),
        failed_sites=tuple(f.site_id for f in updates.failures) if updates else (),
        registered=_output(result, "registered_model") or {},
        error="" if result.success else _error(result),
    )


def run_campaign(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    rounds: int,
    config: RoundConfig,
    on_round: Callable[[RoundResult], None] | None = None,
    log_level: str = "INFO",
) -> list[RoundResult]:
    """Up to `rounds` rounds; stops at the first failed round (its reason is in the result)."""
    campaign_id = f"inline-{uuid.uuid4().hex[:8]}"
    results = []
    for index in range(1, rounds + 1):
        tags = {**campaign_tags(campaign_id, index, rounds), DRIVER_TAG: "inline"}
        outcome = run_round(defs, instance, config, tags, log_level=log_level)
        results.append(outcome)
        if on_round:
            on_round(outcome)
        if not outcome.success:
            break
    return results
