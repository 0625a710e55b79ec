"""A round that fails after the sites have trained loses nothing: re-executed from the failed
step (as the UI's "Re-execute from failure" does), it finishes without asking sites to retrain."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from twin_pipelines.definitions import build_definitions, resources_from_env
from twin_pipelines.jobs import ROUND_JOB
from twin_pipelines.local_fleet import LocalFleet, SiteLaunch

pytestmark = pytest.mark.integration


def round_job() -> dg.JobDefinition:
    """Built from the environment at call time, like the code location (reconstructable)."""
    return build_definitions(**resources_from_env()).resolve_job_def(ROUND_JOB)


def _train_entries(state_dir: Path, round_key: str) -> int:
    entries = [json.loads(line) for line in (state_dir / "journal.jsonl").read_text().splitlines()]
    return sum(1 for e in entries if e["kind"] == "train" and e["round"] == round_key)


def test_reexecution_from_failure_reuses_persisted_updates(tmp_path: Path, monkeypatch):
    with LocalFleet(tmp_path / "sites") as workers, dg.instance_for_test() as instance:
        workers.start([SiteLaunch(s, synthetic=True) for s in ("site-1", "site-2")])
        monkeypatch.setenv("TWIN_HOME", str(tmp_path / "home"))
        monkeypatch.setenv(
            "TWIN_SITES", ",".join(f"{s}={a}" for s, a in workers.endpoints().items())
        )
        monkeypatch.setenv("TWIN_MODEL_NAME", "reexecution")
        monkeypatch.setenv("TWIN_INSECURE", "1")  # local/dev mode, said explicitly
        (tmp_path / "not-a-dir").write_text("")  # a registry path that cannot be created
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/not-a-dir/mlflow.db")
        instance.add_dynamic_partitions("fl_round", ["r0001"])
        config = {"ops": {"round_plan": {"config": {"min_sites": 2}}}}
        job = dg.reconstructable(round_job)
        with dg.execute_job(
            job, instance, run_config=config, tags={"dagster/partition": "r0001"}
        ) as first:
            assert not first.success
            failed = {e.step_key for e in first.all_events if e.is_step_failure}
            assert failed == {"round_evaluation"}  # the registry was unreachable
        assert (tmp_path / "home" / "rounds" / "r0001" / "candidate.twt").exists()

        blocker = tmp_path / "not-a-dir"
        blocker.unlink()
        blocker.mkdir()  # the operator fixes the registry's storage
        options = dg.ReexecutionOptions.from_failure(first.run_id, instance)
        with dg.execute_job(
            job, instance, reexecution_options=options, tags={"dagster/partition": "r0001"}
        ) as second:
            assert second.success
            ran = {e.step_key for e in second.all_events if e.is_step_success}
            assert ran == {"round_evaluation", "twin_evaluation", "registered_model"}
        for site in ("site-1", "site-2"):
            assert _train_entries(workers.sites[site].state_dir, "r0001") == 1
