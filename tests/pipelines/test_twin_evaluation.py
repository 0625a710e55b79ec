"""The twin_evaluation asset: the twin's fitness for trial simulation in Dagster and MLflow,
with the cohort's truth (bias reported) and without it (a user's own data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SITES
from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.resources import InProcessFleet

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def truth_handlers(cohort_dir: Path, twin_schema):
    """Site handlers that hold the generator's truth, as `--truth` gives a worker."""
    from site_worker.data import load_file
    from site_worker.handler import SiteHandler
    from twin_core.oracle import Oracle

    summary = json.loads((cohort_dir / "truth" / "summary.json").read_text())
    out = {}
    for site in SITES:
        schema, frame = load_file(cohort_dir / "sites" / f"{site}.csv", cohort_dir / "schema.yaml")
        out[site] = SiteHandler(site, schema, frame, oracle=Oracle.from_summary(summary, site))
    return out


def _materialization(instance, run_id: str, asset: str):
    import dagster as dg

    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    for record in records:
        materialization = record.event_log_entry.dagster_event.step_materialization_data
        if materialization.materialization.asset_key.path[-1] == asset:
            return materialization.materialization.metadata
    raise AssertionError(f"{asset} was not materialized")


def test_twin_evaluation_with_the_truth(truth_handlers, cohort_dir, round_env, instance):
    env = round_env(
        InProcessFleet(truth_handlers), truth=str(cohort_dir / "truth" / "summary.json")
    )
    result = run_round(env.defs, instance, RoundConfig(min_sites=3, coverage_range=[0.8, 0.97]))
    assert result.success, result.error
    doc = env.store.read_json(result.round_key, "twin_evaluation.json")
    report = doc["report"]
    assert report["truth_known"] is True
    assert [r["horizon"] for r in report["horizons"]] == [1, 2, 3, 4, 5, 6]
    h1 = report["horizons"][0]
    assert h1["oracle_mae"] > 0 and h1["vs_oracle"] == pytest.approx(h1["mae"] / h1["oracle_mae"])
    assert h1["naive_mae"] > h1["oracle_mae"]
    procova = next(e for e in report["effects"] if e["method"] == "procova")
    assert procova["truth"] == -2.4
    assert procova["bias"] == pytest.approx(procova["estimate"] + 2.4)
    assert procova["ci95"][0] < procova["estimate"] < procova["ci95"][1]
    for name in ("horizons.png", "trajectories.png"):
        assert Path(doc["figures"][name]).read_bytes()[:8] == PNG

    # in the Dagster UI: headline numbers, tables and the figures inline
    metadata = _materialization(instance, result.run_id, "twin_evaluation")
    assert metadata["coverage90_all"].value == pytest.approx(report["coverage90"])
    assert "mae_h1_vs_oracle" in metadata and "procova_bias" in metadata
    assert metadata["figure_horizons"].value.startswith("![horizons.png](data:image/png;base64,")
    assert "figure_trajectories" in metadata
    assert len(metadata["horizons"].value.records) == 6

    # in the registry: tags, metrics, artifacts and the model card
    version = env.versions()[-1]
    assert version.tags["twin.coverage90"] == f"{report['coverage90']:.4f}"
    assert "95% CI" in version.tags["twin.procova_ate"]
    assert float(version.tags["twin.procova_ate_bias_vs_truth"]) == pytest.approx(
        procova["bias"], abs=1e-4
    )
    assert "## Fitness for trial simulation" in version.description
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env.registry.tracking_uri)
    files = {f.path for f in client.list_artifacts(version.run_id, "twin")}
    assert files == {"twin/horizons.png", "twin/trajectories.png"}
    run = client.get_run(version.run_id)
    assert run.data.metrics["twin/coverage90_all"] == pytest.approx(report["coverage90"])
    assert "twin_evaluation.json" in {f.path for f in client.list_artifacts(version.run_id)}
    # per site: the headline figures and the first visit ahead as metrics; every horizon in
    # the run's round_evaluation.json
    site = sorted(result.sites)[0]
    assert {"loss", "mae", "mae_h1", "coverage90_h1", "variance_ratio"} <= {
        k.split("/")[-1] for k in run.data.metrics if k.startswith(f"site/{site}/")
    }
    assert not [k for k in run.data.metrics if k.startswith("site/") and k.endswith("_h2")]
    evaluation = json.loads(
        Path(client.download_artifacts(version.run_id, "round_evaluation.json")).read_text()
    )
    assert "mae_h6" in evaluation["per_site"][site]


def test_twin_evaluation_on_data_without_truth(handlers_without_truth, round_env, instance):
    """A user's own data: everything but the oracle and the bias against truth."""
    env = round_env(InProcessFleet(handlers_without_truth))
    result = run_round(env.defs, instance, RoundConfig(min_sites=3))
    assert result.success, result.error
    doc = env.store.read_json(result.round_key, "twin_evaluation.json")
    report = doc["report"]
    assert report["truth_known"] is False
    assert all(r["oracle_mae"] is None for r in report["horizons"])
    assert all(e["bias"] is None and e["truth"] is None for e in report["effects"])
    assert {e["method"] for e in report["effects"]} == {"procova", "unadjusted", "twin"}
    assert list(doc["figures"]) == ["horizons.png"]  # no synthetic patients to picture
    metadata = _materialization(instance, result.run_id, "twin_evaluation")
    assert metadata["ground_truth"].value.startswith("none")
    assert "procova_bias" not in metadata
    version = env.versions()[-1]
    assert "twin.procova_ate_bias_vs_truth" not in version.tags
    assert "bias against the true effect is unknown" in version.description


@pytest.fixture(scope="module")
def handlers_without_truth(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in SITES}


def test_coverage_gate_blocks_registration(handlers_without_truth, round_env, instance):
    env = round_env(InProcessFleet(handlers_without_truth))
    result = run_round(env.defs, instance, RoundConfig(min_sites=3, coverage_range=[0.99, 1.0]))
    assert not result.success
    assert "check interval_coverage failed" in result.error and "outside [0.99, 1]" in result.error
    assert env.versions() == []  # nothing registered
    assert env.store.latest_passed() is None


def test_coverage_range_must_be_an_interval():
    problems = RoundConfig(coverage_range=[0.9]).problems()
    assert any("coverage_range must be [low, high]" in p for p in problems)
    assert RoundConfig(coverage_range=[0.85, 0.95]).problems() == []
