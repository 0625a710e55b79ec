"""`twin ui` (what `make ui` runs): Dagster UI and MLflow UI up, a campaign launched the way a
user launches it (the launchpad's GraphQL call), chained by the sensor, registered in MLflow."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["data"]


def _wait(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what} not reached in {timeout} s; log:\n{log.read_text()[-3000:]}")


LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
RUNS = "{ runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }"
LOADED = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"


def test_ui_command_serves_both_uis_and_runs_a_campaign(tmp_path: Path):
    dagster_port, mlflow_port = _free_port(), _free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "TWIN_HOME": str(tmp_path / "home")}
    with open(log, "wb") as fh:
        ui = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twin_pipelines",
                "ui",
                "--sites",
                "3",
                "--dagster-port",
                str(dagster_port),
                "--mlflow-port",
                str(mlflow_port),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        _wait(
            lambda: (
                [
                    e["loadStatus"]
                    for e in _graphql(dagster_port, LOADED)["workspaceOrError"]["locationEntries"]
                ]
                == ["LOADED"]
            ),
            150,
            "Dagster code location loaded",
            log,
        )
        _wait(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5).status
                == 200
            ),
            150,
            "MLflow UI healthy",
            log,
        )
        params = {
            "selector": {
                "repositoryLocationName": "twin_pipelines",
                "repositoryName": "__repository__",
                "jobName": "fl_campaign_job",
            },
            "runConfigData": {
                "ops": {"start_campaign": {"config": {"rounds": 1, "round": {"min_sites": 3}}}}
            },
        }
        launched = _graphql(dagster_port, LAUNCH, {"p": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched

        def round_done():
            runs = _graphql(dagster_port, RUNS)["runsOrError"]["results"]
            rounds = [r for r in runs if r["jobName"] == "fl_round_job"]
            assert all(r["status"] not in ("FAILURE", "CANCELED") for r in rounds), rounds
            return rounds if rounds and all(r["status"] == "SUCCESS" for r in rounds) else None

        rounds = _wait(round_done, 240, "the campaign's round to succeed", log)
        assert len(rounds) == 1
        tags = {t["key"]: t["value"] for t in rounds[0]["tags"]}
        assert tags["dagster/partition"] == "r0001" and tags["twin/campaign_round"] == "1"
        url = (
            f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/registered-models/alias"
            "?name=patient-twin&alias=champion"
        )
        with urllib.request.urlopen(url, timeout=30) as reply:
            version = json.loads(reply.read())["model_version"]
        tags = {t["key"]: t["value"] for t in version["tags"]}
        assert tags["twin.round"] == "r0001" and tags["twin.dagster_run_id"] == rounds[0]["runId"]
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
    for port in (dagster_port, mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served after stop"
