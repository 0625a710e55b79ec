"""Jobs: one round (in-process: every step in the run's own process), and a campaign starter."""

import dagster as dg
from pydantic import Field

from twin_pipelines.config import CampaignConfig
from twin_pipelines.partitions import fl_round
from twin_pipelines.resources import MlflowRegistry
from twin_pipelines.resources.registry import ReviewRefused

ROUND_JOB = "fl_round_job"

# In-process: a round's steps are I/O-bound orchestration; a process per step would re-import
# torch and MLflow for each (seconds per step) while the real compute happens at the sites.
fl_round_job = dg.define_asset_job(
    ROUND_JOB,
    selection=dg.AssetSelection.groups("fl_round"),
    partitions_def=fl_round,
    executor_def=dg.in_process_executor,
    description="One federated round: plan, site updates, aggregation, evaluation, registration.",
)


@dg.op(description="Check the campaign's config; the campaign sensor then chains its rounds.")
def start_campaign(context: dg.OpExecutionContext, config: CampaignConfig) -> None:
    problems = config.round.problems()
    if config.rounds < 1:
        problems.append(f"rounds must be >= 1, got {config.rounds}")
    if problems:
        raise dg.Failure(f"invalid campaign config: {'; '.join(problems)}")
    context.log.info(
        f"campaign {context.run_id}: {config.rounds} round(s) queued by the campaign sensor"
    )


@dg.job(
    description="Start a campaign of N rounds (set `rounds` and the round config in the launchpad)."
)
def fl_campaign_job() -> None:
    start_campaign()


monitoring_job = dg.define_asset_job(
    "monitoring_job",
    selection=dg.AssetSelection.groups("monitoring"),
    executor_def=dg.in_process_executor,
    description="Refresh every site's data check, drift summary and the champion's performance.",
)


class ReviewConfig(dg.Config):
    """A reviewer's decision on a registered version that waits for review."""

    version: str = Field(description="the registered model version, e.g. 7")
    decision: str = Field(description="approve or reject")
    reviewer: str = Field(description="who decides (recorded as governance.reviewer)")
    note: str = Field(default="", description="why (recorded as governance.note)")


@dg.op(
    description="Record a reviewer's decision; approval promotes to champion if the policy holds."
)
def review_model_version(
    context: dg.OpExecutionContext, config: ReviewConfig, registry: MlflowRegistry
) -> None:
    try:
        status = registry.review(config.version, config.decision, config.reviewer, config.note)
    except ReviewRefused as exc:
        raise dg.Failure(str(exc)) from None
    context.log.info(f"{registry.model_name} v{config.version}: {status} by {config.reviewer}")


@dg.job(description="Governance: approve or reject a version registered with promotion=manual.")
def review_job() -> None:
    review_model_version()
