"""The campaign sensor: when a campaign starts or one of its rounds succeeds, run the next."""

import dagster as dg

from twin_pipelines.jobs import fl_campaign_job, fl_round_job
from twin_pipelines.partitions import fl_round, next_round_key

CAMPAIGN_TAG = "twin/campaign"
INDEX_TAG = "twin/campaign_round"
TOTAL_TAG = "twin/campaign_rounds"
DRIVER_TAG = "twin/campaign_driver"  # "inline": rounds are chained by the caller, not the sensor


def campaign_tags(campaign_id: str, index: int, total: int) -> dict[str, str]:
    return {CAMPAIGN_TAG: campaign_id, INDEX_TAG: str(index), TOTAL_TAG: str(total)}


def next_round_request(
    run: dg.DagsterRun, instance: dg.DagsterInstance
) -> dg.RunRequest | dg.SkipReason:
    """The next round of the campaign `run` belongs to, or why there is none."""
    if run.job_name == fl_campaign_job.name:
        config = run.run_config["ops"]["start_campaign"]["config"]
        total = int(config.get("rounds", 3))
        round_config = config.get("round", {})
        campaign_id, done = run.run_id, 0
    elif run.tags.get(DRIVER_TAG) == "inline":
        return dg.SkipReason(f"run {run.run_id} belongs to an inline campaign")
    elif CAMPAIGN_TAG in run.tags:
        total, done = int(run.tags[TOTAL_TAG]), int(run.tags[INDEX_TAG])
        campaign_id = run.tags[CAMPAIGN_TAG]
        round_config = run.run_config.get("ops", {}).get("round_plan", {}).get("config", {})
    else:
        return dg.SkipReason(f"run {run.run_id} is not part of a campaign")
    if done >= total:
        return dg.SkipReason(f"campaign {campaign_id} finished its {total} round(s)")
    key = next_round_key(instance)
    instance.add_dynamic_partitions(fl_round.name, [key])
    return dg.RunRequest(
        run_key=f"{campaign_id}:{done + 1}",
        partition_key=key,
        run_config={"ops": {"round_plan": {"config": round_config}}},
        tags=campaign_tags(campaign_id, done + 1, total),
    )


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[fl_campaign_job, fl_round_job],
    request_job=fl_round_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=5,
    description="Chains the rounds of a campaign: each success requests the next round.",
)
def campaign_sensor(context: dg.RunStatusSensorContext):
    return next_round_request(context.dagster_run, context.instance)
