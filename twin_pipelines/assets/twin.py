"""twin_evaluation: is the candidate fit for trial simulation (patient twin only)?"""

import dagster as dg
import numpy as np

from twin_core.gates import coverage_gate
from twin_core.rounds import Candidate, RoundEvaluation, RoundPlan
from twin_core.schema import parse_schema
from twin_core.twin_report import twin_report
from twin_pipelines.config import RoundConfig
from twin_pipelines.metadata import check_result, twin_metadata
from twin_pipelines.partitions import fl_round
from twin_pipelines.resources import CohortTruth, RoundStore

SHOWCASE = 2  # patients per pictured site (one control, one treated)


def _showcase(task, model, summary: dict) -> tuple[dict, list[str], np.ndarray]:
    """Forecasts of a few fresh synthetic patients (never a site's) from the smallest and the
    largest site's generator, with their true course: the picture a reviewer reads."""
    from twin_core.cohort import showcase_cohort

    cohort = showcase_cohort(summary)
    sizes = {s: v["n_patients"] for s, v in summary["sites"].items()}
    pictured = sorted({min(sizes, key=sizes.get), max(sizes, key=sizes.get)})
    parts, labels, latent = [], [], []
    for site in pictured:
        frame = cohort.site(site)
        forecasts = task.baseline_forecasts(model, frame)
        seen = np.isfinite(forecasts["observed"]).sum(1)
        truth = cohort.truth[cohort.truth["site"] == site]
        for arm in (0.0, 1.0):
            candidates = np.nonzero(forecasts["arm"] == arm)[0]
            if not len(candidates):
                continue
            i = candidates[np.argmax(seen[candidates])]
            parts.append({k: v[i : i + 1] for k, v in forecasts.items()})
            rows = truth[truth["patient_id"] == forecasts["ids"][i]].sort_values("visit")
            latent.append(rows["z_treated" if arm else "z_control"].to_numpy())
            labels.append(f"synthetic patient {chr(ord('A') + len(labels))}, like {site}")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return merged, labels, np.stack(latent)


@dg.asset(
    partitions_def=fl_round,
    group_name="fl_round",
    kinds={"python"},
    check_specs=[
        dg.AssetCheckSpec(
            "interval_coverage",
            asset="twin_evaluation",
            blocking=True,
            description="the twin's 90 % intervals cover within the configured range",
        )
    ],
)
def twin_evaluation(
    context: dg.AssetExecutionContext,
    round_plan: RoundPlan,
    global_model: Candidate,
    round_evaluation: RoundEvaluation,
    store: RoundStore,
    truth: CohortTruth,
):
    """The twin's fitness for trial simulation: forecast error by horizon beside the last
    value and the oracle, interval coverage, PROCOVA and counterfactual effects with 95 %
    intervals, and bias against the true effect where the cohort's truth is known."""
    from twin_core.tasks import task_for
    from twin_core.training import load_weights_into
    from twin_pipelines.figures import horizon_figure, inline_markdown, trajectory_figure

    config = RoundConfig(**round_plan.config)
    bounds = tuple(config.coverage_range) or None
    schema = parse_schema(round_plan.schema)
    task = task_for(schema)
    key = round_plan.round_key
    if task.name != "patient_twin":
        yield dg.Output({"applicable": False}, metadata={"note": f"task {task.name}: no twin"})
        yield check_result(coverage_gate(None, None), "not a patient twin: no coverage gate")
        return
    summary = truth.summary()
    report = twin_report(
        round_evaluation.pooled, round_evaluation.per_site, schema.horizon, summary
    )
    folder = store.round_dir(key) / "twin"
    files = {
        "horizons.png": horizon_figure(
            report, folder / "horizons.png", f"{key}: error and calibration by horizon"
        )
    }
    if summary is not None:
        model = task.build_model(round_plan.moments, seed=0)
        load_weights_into(model, store.load(global_model.path).weights)
        forecasts, labels, latent = _showcase(task, model, summary)
        files["trajectories.png"] = trajectory_figure(
            forecasts, labels, folder / "trajectories.png", latent
        )
    doc = {
        "applicable": True,
        "report": report.as_dict(),
        "headline": report.headline(),
        "figures": {name: str(path) for name, path in files.items()},
    }
    store.write_json(key, "twin_evaluation.json", doc)
    figures = {
        f"figure_{name.removesuffix('.png')}": inline_markdown(path, name)
        for name, path in files.items()
    }
    yield dg.Output(doc, metadata=twin_metadata(report, figures))
    yield check_result(coverage_gate(report.coverage90, bounds))
