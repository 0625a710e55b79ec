"""What the sites say about their data now: data checks, drift, and the champion's performance.

Refreshed by the monitoring schedule; the drift sensor reads these materializations and starts
a retraining campaign when a site crosses its thresholds.
"""

from dataclasses import asdict

import dagster as dg

from twin_core.dispatch import run_on_sites, split_failures
from twin_core.monitoring import monitoring_values
from twin_core.rounds import pool_evaluations
from twin_core.schema import parse_schema
from twin_pipelines.metadata import drift_metadata, performance_metadata, quality_metadata
from twin_pipelines.resources import Fleet, MlflowRegistry, RoundStore

GROUP = "monitoring"


class MonitoringConfig(dg.Config):
    timeout_s: float = 180.0


def _ask_every_site(fleet: Fleet, config: MonitoringConfig, stage: str, call) -> tuple[dict, list]:
    """`call(site, timeout)` at every site at once: (answers by site, failures)."""
    results = run_on_sites(
        fleet.sites(),
        lambda site: call(site, config.timeout_s),
        stage=stage,
        timeout=config.timeout_s + 5,
    )
    return split_failures(results)


@dg.asset(group_name=GROUP, kinds={"great_expectations"})
def site_data_quality(
    context: dg.AssetExecutionContext, config: MonitoringConfig, fleet: dg.ResourceParam[Fleet]
) -> dg.Output[dict]:
    """Each site's latest Great Expectations check of its data, and its quality score."""
    reports, failures = _ask_every_site(fleet, config, "data_check", lambda s, t: s.check_data(t))
    return dg.Output(reports, metadata=quality_metadata(reports, failures))


@dg.asset(group_name=GROUP, kinds={"evidently"})
def site_drift(
    context: dg.AssetExecutionContext,
    config: MonitoringConfig,
    fleet: dg.ResourceParam[Fleet],
    registry: MlflowRegistry,
) -> dg.Output[dict]:
    """Each site's Evidently drift summary: its current window against the data it last
    trained on. The summaries (never the data) are also kept as a JSON artifact in MLflow."""
    summaries, failures = _ask_every_site(fleet, config, "drift", lambda s, t: s.drift(t))
    doc = {
        s: {k: v for k, v in asdict(d).items() if k != "report_html"} for s, d in summaries.items()
    }
    run_id = registry.log_monitoring("site_drift", doc)
    return dg.Output(
        summaries, metadata={**drift_metadata(summaries, failures), "mlflow_run_id": run_id}
    )


@dg.asset(group_name=GROUP, kinds={"pytorch"})
def champion_performance(
    context: dg.AssetExecutionContext,
    config: MonitoringConfig,
    fleet: dg.ResourceParam[Fleet],
    store: RoundStore,
    registry: MlflowRegistry,
) -> dg.Output[dict]:
    """The champion evaluated at every site now, beside the same per-site metric at its
    registration (the task's monitoring metric: trajectory MAE for the patient twin)."""
    from twin_core.tasks import task_for

    champion = registry.champion()
    if champion is None or not champion.round_key:
        return dg.Output({}, metadata={"champion": "none registered yet"})
    candidate = store.load(store.round_dir(champion.round_key) / "candidate.twt")
    plan = store.read_json(champion.round_key, "plan.json")
    task = task_for(parse_schema(plan["schema"]))
    evaluations, failures = _ask_every_site(
        fleet,
        config,
        "evaluate",
        lambda s, t: s.evaluate("monitor", champion.schema_fingerprint, candidate.weights, t),
    )
    metric = champion.monitoring_metric
    per_site = pool_evaluations(task, evaluations).per_site
    doc = {
        "version": champion.version,
        "metric": metric,
        "now": monitoring_values(per_site, metric),
        "at_registration": {s: list(v) for s, v in champion.site_monitoring.items()},
    }
    return dg.Output(doc, metadata=performance_metadata(doc, failures))


MONITORING_ASSETS = [site_data_quality, site_drift, champion_performance]
