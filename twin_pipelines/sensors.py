"""Sensors: the campaign sensor chains a campaign's rounds; the drift sensor starts campaigns."""

import json
from dataclasses import replace

import dagster as dg

from twin_core.monitoring import DriftTrigger, data_drift_triggers, performance_triggers
from twin_pipelines.jobs import fl_campaign_job, fl_round_job
from twin_pipelines.metadata import summaries_from_json
from twin_pipelines.partitions import fl_round, next_round_key
from twin_pipelines.resources import DriftPolicy

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


DRIFT_ASSETS = ("site_drift", "champion_performance")


def _latest(instance: dg.DagsterInstance, asset: str):
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    return records[0] if records else None


def drift_request(
    records: dict, policy: DriftPolicy
) -> tuple[dg.RunRequest | dg.SkipReason, list[DriftTrigger]]:
    """A retraining campaign for the sites the new monitoring records flag, or why none.

    The run key names each trigger with the reference it drifted from (the round the site last
    trained in) or the champion version that degraded, so the same drift never starts two
    campaigns, however often monitoring sees it again.
    """
    triggers: list[DriftTrigger] = []
    if (record := records.get("site_drift")) is not None:
        summaries = summaries_from_json(record.asset_materialization.metadata["summaries"].value)
        triggers += data_drift_triggers(summaries, policy.drift_share, policy.site_drift_share)
    if (record := records.get("champion_performance")) is not None:
        metadata = record.asset_materialization.metadata
        if "performance" in metadata:
            perf = metadata["performance"].value
            version = str(metadata["champion_version"].value)
            now = {s: v[0] for s, v in perf["now"].items()}
            then = {s: v[0] for s, v in perf["at_registration"].items()}
            errors = tuple(
                {s: v[1] for s, v in side.items() if v[1] is not None}
                for side in (perf["now"], perf["at_registration"])
            )
            triggers += [
                replace(t, reference_round=f"v{version}")
                for t in performance_triggers(
                    now, then, policy.performance_tolerance, perf["metric"], errors
                )
            ]
    if not triggers:
        return dg.SkipReason("no site crossed its drift thresholds"), []
    key = "drift:" + ",".join(f"{t.site_id}/{t.kind}/{t.reference_round}" for t in triggers)
    sites = sorted({t.site_id for t in triggers})
    request = dg.RunRequest(
        run_key=key,
        run_config={"ops": {"start_campaign": {"config": {"rounds": policy.campaign_rounds}}}},
        tags={
            "twin/trigger": "drift",
            "twin/drift_sites": ",".join(sites),
            "twin/drift_scores": json.dumps(
                {f"{t.site_id}/{t.kind}": round(t.score, 4) for t in triggers}, sort_keys=True
            ),
        },
    )
    return request, triggers


@dg.sensor(
    job=fl_campaign_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts a retraining campaign when a site's data drifts or the champion degrades.",
)
def drift_sensor(context: dg.SensorEvaluationContext, drift_policy: DriftPolicy):
    cursor = json.loads(context.cursor) if context.cursor else {}
    fresh = {}
    for asset in DRIFT_ASSETS:
        record = _latest(context.instance, asset)
        if record is not None and record.storage_id > cursor.get(asset, 0):
            fresh[asset] = record
            cursor[asset] = record.storage_id
    context.update_cursor(json.dumps(cursor))
    if not fresh:
        return dg.SkipReason("no new monitoring results")
    request, triggers = drift_request(fresh, drift_policy)
    for trigger in triggers:
        context.log.info(f"{trigger.site_id}: {trigger.kind}: {trigger.detail}")
    return request
