"""Schedules: hourly monitoring of the sites, and a weekly continuous-improvement campaign."""

import dagster as dg

from twin_pipelines.jobs import fl_campaign_job, monitoring_job

monitoring_schedule = dg.ScheduleDefinition(
    name="monitoring_schedule",
    job=monitoring_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly: data checks, drift and champion performance at every site.",
)

improvement_schedule = dg.ScheduleDefinition(
    name="improvement_schedule",
    job=fl_campaign_job,
    cron_schedule="0 3 * * 1",
    run_config={"ops": {"start_campaign": {"config": {"rounds": 3}}}},
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly (Monday 03:00): a 3-round campaign, so the model keeps improving.",
)
