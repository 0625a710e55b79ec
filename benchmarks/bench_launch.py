"""Benchmark 4: a round launched the way users launch it, from request to registered result.

`dagster dev` runs on the repository's workspace.yaml (webserver, daemon, code server), as
`twin ui` starts it, against a temporary DAGSTER_HOME configured as the embedded default's
(`TwinHome.ensure_dagster_home`), with 4 real `python -m site_worker` processes (100 k
parameter twin, 200 patients each, `local_steps: 5`). Each round is what the launchpad does:
GraphQL `addDynamicPartition` for the new `fl_round` key, then `launchPipelineExecution` of
`fl_round_job` on it (DagsterGraphQLClient.submit_job_execution with the partition tag), then
the run's status is polled (every 0.1 s) until it succeeds: its last step registers the model
in MLflow. The figure is the median over the rounds, request to success.

The baseline is the same round in a warm process (`campaign.run_round`, as benchmark 3 and
the demo run it) over the same sites, interleaved with the launched rounds. Where the
difference goes is read from the run record and event log (queued, starting, running); a
fresh process's import of the code location is timed apart, and so are, in CPU seconds, the
first uses the run then pays (torch, MLflow's import and store, matplotlib, MLflow's
requirements check), which a warm process has paid already.

`--quick` cannot start a webserver in a few seconds: it times the code location's import in a
fresh process only (what every launched run pays before its first step), and says so.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import rounds_env as env
from benchmarks.harness import Result, Target, median

ORDER = 4
TITLE = "round launched through the Dagster webserver"
TARGET = Target("figure", "<=", 5.0)
SITES, PATIENTS, LOCAL_STEPS, ROUNDS = 4, 200, 5, 5
REPO = Path(__file__).resolve().parents[1]
LOCATION, REPOSITORY = "twin_pipelines", "__repository__"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_seconds() -> float:
    """A fresh interpreter importing the code location (what a launched run starts with)."""
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import twin_pipelines.definitions"],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return time.perf_counter() - began


# What a launched run's process pays on first use, beyond importing the code location: each
# step timed in CPU seconds (the machine may be busy), in the order a round meets them.
FIRST_USE = r"""
import json, time
import twin_pipelines.definitions as location
out = {}
def timed(name, work):
    began = time.process_time()
    work()
    out[name] = time.process_time() - began
timed("torch (the task)", lambda: __import__("twin_core.tasks"))
timed("mlflow import", lambda: __import__("mlflow"))
timed("MLflow store and champion", location.resources_from_env()["registry"].champion)
timed("matplotlib", lambda: __import__("matplotlib.figure"))
def requirements():
    from mlflow.utils.requirements_utils import _init_packages_to_modules_map
    _init_packages_to_modules_map()
timed("MLflow's requirements check", requirements)
print(json.dumps(out))
"""


def first_use_seconds(env: dict[str, str]) -> dict[str, float]:
    """CPU seconds of each first use a launched run pays (torch, MLflow, matplotlib), in a
    fresh process with the launched runs' environment; medians of three processes."""
    import json

    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", FIRST_USE],
                check=True,
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(3)
    ]
    return {k: median([r[k] for r in runs]) for k in runs[0]}


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    import requests

    response = requests.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": variables or {}},
        timeout=60,
    )
    response.raise_for_status()
    doc = response.json()
    if doc.get("errors"):
        raise RuntimeError(f"GraphQL errors: {doc['errors']}")
    return doc["data"]


def _await_loaded(port: int, process: subprocess.Popen, log: Path, timeout: float) -> float:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"dagster dev exited:\n{log.read_text()[-3000:]}")
        try:
            entries = _graphql(port, query)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return time.perf_counter() - began
        except Exception:  # not serving yet
            pass
        time.sleep(0.5)
    raise RuntimeError(f"dagster dev not loaded in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


ADD_PARTITION = """
mutation($repo: RepositorySelector!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: "fl_round",
                      partitionKey: $key) {
    __typename
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""


def _launch_round(port: int, client, key: str, config: dict) -> tuple[str, float]:
    """One round as the launchpad starts it; returns (run id, seconds to success)."""
    from dagster import DagsterRunStatus

    began = time.perf_counter()
    added = _graphql(
        port,
        ADD_PARTITION,
        {"repo": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}, "key": key},
    )["addDynamicPartition"]
    if added["__typename"] != "AddDynamicPartitionSuccess":
        raise RuntimeError(f"addDynamicPartition {key}: {added}")
    run_id = client.submit_job_execution(
        "fl_round_job",
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        run_config={"ops": {"round_plan": {"config": config}}},
        tags={"dagster/partition": key},
    )
    while True:
        status = client.get_run_status(run_id)
        if status == DagsterRunStatus.SUCCESS:
            return run_id, time.perf_counter() - began
        if status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            raise RuntimeError(f"launched round {key} ({run_id}) ended {status.value}")
        time.sleep(0.1)


def _phases(instance, run_id: str) -> dict[str, float]:
    """Where a launched run's time went, from its run record and event log."""
    from dagster import DagsterEventType

    stamps: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        if entry.is_dagster_event:
            stamps.setdefault(entry.dagster_event.event_type_value, entry.timestamp)
    record = instance.get_run_record_by_id(run_id)
    created = record.create_timestamp.timestamp()
    queued_to_starting = stamps.get(DagsterEventType.PIPELINE_STARTING.value, created) - created
    starting_to_start = stamps.get(DagsterEventType.PIPELINE_START.value, 0) - stamps.get(
        DagsterEventType.PIPELINE_STARTING.value, created
    )
    steps = env.step_times(instance, run_id)
    return {
        **steps.body,
        "queued": queued_to_starting,
        "process": starting_to_start,
        "run": stamps.get(DagsterEventType.PIPELINE_SUCCESS.value, 0)
        - stamps.get(DagsterEventType.PIPELINE_START.value, 0),
        "bodies": sum(steps.body.values()),
    }


def _full() -> Result:
    import dagster as dg
    from dagster_graphql import DagsterGraphQLClient

    from twin_pipelines.campaign import run_round
    from twin_pipelines.config import RoundConfig
    from twin_pipelines.definitions import build_definitions
    from twin_pipelines.home import TwinHome

    config = RoundConfig(local_steps=LOCAL_STEPS, min_sites=SITES, secure_aggregation=False)
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        root = Path(tmp)
        cohort = env.write_cohort(root / "cohort", SITES, PATIENTS, env.HIDDEN["100k"])
        params = env.parameter_count(cohort)
        with env.site_fleet(root, cohort, SITES) as fleet:
            home = TwinHome(root / "twin")
            dagster_home = home.ensure_dagster_home()
            sites_file = fleet.write_sites_file(home.sites_file)
            port = _free_port()
            log = root / "dagster.log"
            child_env = {
                **os.environ,
                "DAGSTER_HOME": str(dagster_home),
                "TWIN_HOME": str(home.root),
                "TWIN_SITES_FILE": str(sites_file),
                "TWIN_INSECURE": "1",
                "TWIN_TRUTH": "",
                "MLFLOW_TRACKING_URI": home.tracking_uri,
            }
            child_env.pop("TWIN_SITES", None)
            child_env.pop("TWIN_TLS_DIR", None)
            home.mlflow_dir.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as out:
                dev = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "dagster"),
                        "dev",
                        "-w",
                        str(REPO / "workspace.yaml"),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port),
                    ],
                    cwd=REPO,
                    env=child_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            try:
                ready = _await_loaded(port, dev, log, timeout=300)
                client = DagsterGraphQLClient("127.0.0.1", port_number=port)
                # the warm in-process baseline: its own storage and registry, the same sites
                resources = env.resources(root / "inline", fleet.endpoints())
                defs = build_definitions(**resources)
                inline = dg.DagsterInstance.from_config(
                    str(env.dagster_home(root / "inline" / "twin"))
                )
                launched_s, inline_s, run_ids = [], [], []
                with inline, dg.DagsterInstance.from_config(str(dagster_home)) as instance:
                    for number in range(ROUNDS + 1):  # the first of each is a warm-up
                        began = time.perf_counter()
                        done = run_round(defs, inline, config, log_level="WARNING")
                        if not done.success:
                            raise RuntimeError(f"in-process round failed: {done.error}")
                        inline_took = time.perf_counter() - began
                        run_id, took = _launch_round(
                            port, client, f"r{number + 1:04d}", config.model_dump()
                        )
                        if number:
                            inline_s.append(inline_took)
                            launched_s.append(took)
                            run_ids.append(run_id)
                    phases = [_phases(instance, r) for r in run_ids]
                fresh_import = import_seconds()
                first_use = first_use_seconds(child_env)
            finally:
                os.killpg(dev.pid, signal.SIGTERM)
                try:
                    dev.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(dev.pid, signal.SIGKILL)
                    dev.wait(timeout=10)
    part = {k: env.median_of(phases, k) for k in ("queued", "process", "run", "bodies")}
    assets = "; ".join(f"{s} {env.median_of(phases, s):.2f}" for s in env.STEPS)
    return Result(
        benchmark=f"launched round (dagster dev + GraphQL), {SITES} sites x "
        f"{params / 1e3:,.0f} k params",
        figure=median(launched_s),
        unit="s",
        target=TARGET,
        baseline=median(inline_s),
        baseline_label="the same round in a warm process",
        notes=(
            f"{params:,} parameters, local_steps {LOCAL_STEPS}, the run launcher and "
            f"coordinator of TwinHome's dagster.yaml, fl_round_job's in-process executor; "
            f"median of "
            f"{ROUNDS} rounds after a warm-up round (spread {min(launched_s):.1f}-"
            f"{max(launched_s):.1f} s); dagster dev loaded the code location in {ready:.1f} s",
            "where a launched round's time goes (medians, s): queued until the daemon "
            "dequeued it {queued:.2f}; run process start and code location import "
            "{process:.2f}; the run itself {run:.2f}, of which the assets' own time "
            "{bodies:.2f}".format(**part)
            + f" ({assets}); a fresh process importing the code location: "
            f"{fresh_import:.2f} s",
            "first uses a launched run pays after that (CPU s in a fresh process, medians of "
            "3): " + "; ".join(f"{k} {v:.2f}" for k, v in first_use.items()),
        ),
    )


def run(quick: bool) -> list[Result]:
    env.quiet_env()
    if not quick:
        return [_full()]
    seconds = import_seconds()
    return [
        Result(
            benchmark="launched round: quick run imports the code location only",
            figure=seconds,
            unit="s",
            target=TARGET,
            notes=(
                "--quick skips the launch itself (it needs dagster dev, about 15-20 s to "
                "start); this row is a fresh process importing twin_pipelines.definitions, "
                "which every launched run pays before its first step",
            ),
        )
    ]
