"""registered_model: the passing candidate as an MLflow run and a registered model version."""

import functools
import json
import re
import subprocess
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import dagster as dg

from twin_core.gates import decide_promotion
from twin_core.model_card import model_card, privacy_section
from twin_core.monitoring import monitoring_values
from twin_core.rounds import Candidate, RoundEvaluation, RoundPlan, RoundUpdates
from twin_core.schema import parse_schema
from twin_pipelines.config import RoundConfig
from twin_pipelines.partitions import fl_round, round_number
from twin_pipelines.resources import MlflowRegistry, RoundStore


@functools.cache
def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        own = version("twin-pipelines")
    except PackageNotFoundError:
        own = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return own
    return f"{own}+g{commit}"


def governance_tags(decision, manual: bool, site_tolerance: float) -> dict[str, str]:
    """What a reviewer sees in the registry: the policy's verdict and who decides."""
    if manual:
        status, reviewer = "pending_review", ""
    else:
        status, reviewer = ("approved" if decision.promote else "not_promoted"), "policy:automatic"
    return {
        "governance.status": status,
        "governance.reviewer": reviewer,
        "governance.policy": "promote" if decision.promote else "keep_champion",
        "governance.reasons": "; ".join(decision.reasons),
        "governance.site_tolerance": repr(site_tolerance),
    }


def fitness_tags(twin_evaluation: dict) -> dict[str, str]:
    """The twin's fitness for trial simulation, as version tags a reviewer can filter on."""
    if not twin_evaluation.get("applicable"):
        return {}
    report = twin_evaluation["report"]
    tags = {"twin.coverage90": f"{report['coverage90']:.4f}"}
    rows = report["horizons"]
    if rows and rows[0].get("vs_oracle") is not None:
        tags["twin.mae_h1_vs_oracle"] = f"{rows[0]['vs_oracle']:.4f}"
    for effect in report["effects"]:
        if effect["method"] in ("procova", "twin"):
            low, high = effect["ci95"]
            name = f"twin.{effect['method']}_ate"
            tags[name] = f"{effect['estimate']:.4f} (95% CI {low:.4f} to {high:.4f})"
            if effect["bias"] is not None:
                tags[f"{name}_bias_vs_truth"] = f"{effect['bias']:+.4f}"
    if report.get("variance_ratio") is not None:
        tags["twin.procova_variance_ratio"] = f"{report['variance_ratio']:.4f}"
    return tags


# per-horizon figures beyond the first visit ahead ("mae_h4", "coverage90_h6", ...)
_LATER_HORIZON = re.compile(r"_h(?:[2-9]|\d\d+)$")


def site_metrics(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each site's figures as MLflow metrics ("site/<site>/<name>"): its headline figures and
    the first visit ahead, not every horizon. The rest (about 30 more per site for the patient
    twin) are in the run's round_evaluation.json; as metrics they made 5,000 charts per round
    at 100 sites, and MLflow's SQL store took about 2 s per round to insert them."""
    return {
        f"site/{site}/{name}": value
        for site, figures in per_site.items()
        for name, value in figures.items()
        if not _LATER_HORIZON.search(name)
    }


def _spent(store: RoundStore, plan: RoundPlan) -> dict:
    """Epsilon per privacy scope from the ledger (empty when no round used DP)."""
    ledger = store.ledger()
    if not ledger.entries:
        return {}
    summary = ledger.summary(plan.privacy.get("delta", 1e-5))
    return {
        scope: {
            "epsilon": round(entry["epsilon"], 6),
            "campaigns": {c: round(e, 6) for c, e in entry["campaigns"].items()},
        }
        for scope, entry in summary.items()
    }


def privacy_tags(privacy: dict) -> dict[str, str]:
    """privacy.* version tags: what a governance reviewer filters on in the registry."""
    tags = {
        "privacy.transport": str(privacy.get("transport", "")),
        "privacy.secure_aggregation": "on" if privacy.get("secure_aggregation") else "off",
    }
    for name in ("dp_fedavg", "dp_sgd"):
        if privacy.get(name):
            tags[f"privacy.{name}"] = json.dumps(privacy[name], sort_keys=True)
    spent = privacy.get("spent") or {}
    if spent:
        tags["privacy.delta"] = f"{privacy.get('delta'):g}"
        if privacy.get("budget"):
            tags["privacy.budget"] = f"{privacy['budget']:g}"
        for scope, entry in spent.items():
            tags[f"privacy.epsilon.{scope}"] = f"{entry['epsilon']:.4f}"
        tags["privacy.epsilon_max"] = f"{max(e['epsilon'] for e in spent.values()):.4f}"
    return tags


@dg.asset(partitions_def=fl_round, group_name="fl_round", kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext,
    round_plan: RoundPlan,
    site_updates: RoundUpdates,
    global_model: Candidate,
    round_evaluation: RoundEvaluation,
    twin_evaluation: dict,
    store: RoundStore,
    registry: MlflowRegistry,
) -> dg.Output[dict]:
    """Register the candidate (it passed every gate): lineage tags, model card, aliases."""
    from twin_core.tasks import task_for
    from twin_core.training import load_weights_into

    key = round_plan.round_key
    config = RoundConfig(**round_plan.config)
    task = task_for(parse_schema(round_plan.schema))
    model = task.build_model(round_plan.moments, seed=0)
    load_weights_into(model, store.load(global_model.path).weights)
    pooled = round_evaluation.pooled
    champion = registry.champion()
    champion_loss = champion.pooled_loss if champion else None
    site_losses = {s: m["loss"] for s, m in round_evaluation.per_site.items()}
    # registered_model runs only after every blocking check passed
    decision = decide_promotion(
        pooled["loss"],
        site_losses,
        champion_loss,
        champion.site_losses if champion else {},
        gates_passed=True,
        site_tolerance=config.site_regression_tolerance,
    )
    manual = config.promotion == "manual"
    promote = decision.promote and not manual
    failures = site_updates.failures + round_evaluation.failures
    lineage = {
        "twin.round": key,
        "twin.dagster_run_id": context.run_id,
        "twin.sites": ",".join(global_model.sites),
        "twin.site_examples": json.dumps(global_model.site_examples, sort_keys=True),
        "twin.strategy": config.strategy,
        "twin.strategy_params": json.dumps(config.strategy_params(), sort_keys=True),
        "twin.selection": json.dumps(
            {
                "policy": config.selection,
                "fraction": config.fraction,
                "min_sites": config.min_sites,
                "max_sites": config.max_sites,
            },
            sort_keys=True,
        ),
        "twin.task": task.name,
        "twin.schema_fingerprint": round_plan.selection.schema_fingerprint or "",
        "twin.pooled_loss": repr(float(pooled["loss"])),
        "twin.site_losses": json.dumps(site_losses, sort_keys=True),
        "twin.monitoring_metric": task.monitoring_metric,
        "twin.site_monitoring": json.dumps(
            monitoring_values(round_evaluation.per_site, task.monitoring_metric), sort_keys=True
        ),
        "twin.weights_sha256": global_model.sha256,
        "twin.started_from": round_plan.start_round or "seeded initialisation",
        "twin.code_version": code_version(),
        **fitness_tags(twin_evaluation),
        **governance_tags(decision, manual, config.site_regression_tolerance),
    }
    privacy = {**round_plan.privacy, "spent": _spent(store, round_plan)}
    lineage.update(privacy_tags(privacy))
    fitness = twin_evaluation.get("headline", {})
    registered = registry.register_round(
        round_key=key,
        step=round_number(key),
        model=model,
        params={
            **config.model_dump(),
            "round": key,
            "sites": ",".join(global_model.sites),
            "task": task.name,
        },
        metrics={
            **{f"pooled_{k}": v for k, v in pooled.items()},
            **site_metrics(round_evaluation.per_site),
            **{
                f"train/{u.site_id}/{k}": v
                for u in site_updates.updates
                for k, v in u.metrics.items()
            },
            "examples_total": float(site_updates.total_examples),
            **{f"twin/{k}": v for k, v in fitness.items()},
        },
        run_tags={"twin.round": key, "twin.dagster_run_id": context.run_id},
        version_tags=lineage,
        artifacts={
            "round_plan.json": json.loads(json.dumps(asdict(round_plan), default=str)),
            "round_evaluation.json": asdict(round_evaluation),
            "site_updates.json": asdict(site_updates),
            **(
                {"twin_evaluation.json": twin_evaluation["report"]}
                if twin_evaluation.get("applicable")
                else {}
            ),
        },
        files=dict.fromkeys(twin_evaluation.get("figures", {}).values(), "twin"),
        description=model_card(
            model_name=registry.model_name,
            task=task.name,
            round_key=key,
            strategy=config.strategy,
            site_examples=global_model.site_examples,
            pooled=pooled,
            per_site=round_evaluation.per_site,
            failures=failures,
            schema_fingerprint=lineage["twin.schema_fingerprint"],
            dagster_run_id=context.run_id,
            champion_loss=champion_loss,
            promoted=promote,
            decision_reasons=decision.reasons,
            review="manual" if manual else "automatic",
            site_status=round_plan.site_status,
            fitness=twin_evaluation.get("report"),
            privacy=privacy,
        ),
        promote=promote,
    )
    store.mark_passed(
        key, global_model.path, global_model.sha256, lineage["twin.schema_fingerprint"]
    )
    result = asdict(registered)
    return dg.Output(
        result,
        metadata={
            "model": f"{registered.model_name} v{registered.version}",
            "version": int(registered.version),
            "aliases": "champion, challenger" if promote else "challenger",
            "promoted": promote,
            "mlflow_run": dg.MetadataValue.url(registered.run_url),
            "mlflow_version": dg.MetadataValue.url(registered.version_url),
            "privacy": dg.MetadataValue.md("\n".join(privacy_section(privacy))),
        },
    )
