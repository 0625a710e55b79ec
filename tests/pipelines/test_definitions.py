"""The code location: it loads (lightly), and the campaign sensor chains rounds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from tests.conftest import SITES
from twin_pipelines.config import CampaignConfig, RoundConfig
from twin_pipelines.jobs import ROUND_JOB, fl_campaign_job
from twin_pipelines.resources import InProcessFleet
from twin_pipelines.sensors import CAMPAIGN_TAG, INDEX_TAG, TOTAL_TAG, campaign_sensor

ROOT = Path(__file__).resolve().parents[2]


def test_workspace_loads_without_heavy_imports(tmp_path: Path):
    code = (
        "import sys, twin_pipelines.definitions as d\n"
        "heavy = ('torch', 'mlflow', 'evidently', 'great_expectations')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "jobs = [j.name for j in d.defs.resolve_all_job_defs()]\n"
        "jobs = sorted(j for j in jobs if not j.startswith('__'))\n"
        "print(jobs)\n"
    )
    env = {**os.environ, "TWIN_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip() == "['fl_campaign_job', 'fl_round_job', 'monitoring_job', 'review_job']"
    )
    validate = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        capture_output=True,
        text=True,
        env={**env, "DAGSTER_HOME": str(tmp_path)},
        cwd=ROOT,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr


def _sensor_step(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult):
    event = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_SUCCESS)
    context = dg.build_run_status_sensor_context(
        sensor_name=campaign_sensor.name,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id),
        dagster_event=event,
    )
    return campaign_sensor(context)


def test_campaign_sensor_chains_rounds_to_completion(make_handler, round_env, instance):
    env = round_env(InProcessFleet({s: make_handler(s) for s in SITES[:3]}))
    round_config = RoundConfig(min_sites=3, local_epochs=1)
    start = fl_campaign_job.execute_in_process(
        instance=instance,
        run_config={
            "ops": {
                "start_campaign": {
                    "config": CampaignConfig(rounds=2, round=round_config).model_dump()
                }
            }
        },
    )
    request = _sensor_step(instance, start)
    keys = []
    for index in (1, 2):
        assert isinstance(request, dg.RunRequest), request
        assert request.tags[CAMPAIGN_TAG] == start.run_id
        assert (request.tags[INDEX_TAG], request.tags[TOTAL_TAG]) == (str(index), "2")
        assert request.run_config["ops"]["round_plan"]["config"]["min_sites"] == 3
        assert request.partition_key in instance.get_dynamic_partitions("fl_round")
        keys.append(request.partition_key)
        run = env.defs.resolve_job_def(ROUND_JOB).execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
        )
        assert run.success
        request = _sensor_step(instance, run)
    assert keys == ["r0001", "r0002"]
    assert isinstance(request, dg.SkipReason) and "finished its 2 round(s)" in request.skip_message
    assert [str(v.version) for v in env.versions()] == ["1", "2"]


def test_invalid_campaign_config_is_refused(instance):
    result = fl_campaign_job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={
            "ops": {"start_campaign": {"config": {"rounds": 0, "round": {"min_sites": 0}}}}
        },
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = (
        failure.step_failure_data.error.cause.message
        if failure.step_failure_data.error.cause
        else failure.step_failure_data.error.message
    )
    assert "rounds must be >= 1" in message and "min_sites must be >= 1" in message
