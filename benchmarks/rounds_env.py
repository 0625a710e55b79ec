"""What the round benchmarks (3, 4, 6) share: a synthetic patient-twin cohort of N sites with a
model of a chosen size, real `python -m site_worker` processes over gRPC (LocalFleet, as the
demo starts them), the code location's resources over them, and the per-step timings of a
round read from the Dagster event log.

Not a benchmark itself (the runner runs only `bench_*.py`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from twin_pipelines.local_fleet import LocalFleet

# widths of the twin's MLP (schema `hidden`) for the model sizes the issue names; the actual
# parameter counts are reported by `parameter_count`
HIDDEN = {
    "100k": [300, 300],
    "5M": [2200, 2200],
    "50M": [7070, 7070],
}


def write_cohort(root: Path, n_sites: int, patients: int, hidden: list[int], seed: int = 7) -> Path:
    """The seeded synthetic cohort with `n_sites` sites of `patients` patients each (the
    default sites' profiles, cycled), its schema declaring `hidden`. Returns the folder."""
    from dataclasses import replace

    from twin_core.cohort import DEFAULT_SITES, CohortConfig, generate_cohort, write_cohort

    profiles = tuple(
        replace(DEFAULT_SITES[i % len(DEFAULT_SITES)], site_id=f"site-{i + 1}", n_patients=patients)
        for i in range(n_sites)
    )
    write_cohort(generate_cohort(CohortConfig(seed=seed, sites=profiles)), root)
    schema = yaml.safe_load((root / "schema.yaml").read_text())
    schema["hidden"] = list(hidden)
    (root / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    return root


def parameter_count(cohort: Path) -> int:
    """Learnt parameters of the twin the cohort's schema declares (buffers not counted)."""
    from twin_core.schema import load_schema
    from twin_core.tasks import task_for

    model = task_for(load_schema(cohort / "schema.yaml")).build_model({}, seed=0)
    return sum(p.numel() for p in model.parameters())


def initial_weights(cohort: Path, seed: int = 7) -> dict:
    """The seeded initial twin of the cohort's schema, as weights (what round 1 sends)."""
    from twin_core.schema import load_schema
    from twin_core.tasks import task_for
    from twin_core.training import weights_of

    return weights_of(task_for(load_schema(cohort / "schema.yaml")).build_model({}, seed=seed))


@contextmanager
def site_fleet(root: Path, cohort: Path, n_sites: int) -> Iterator[LocalFleet]:
    """`n_sites` site worker processes serving the cohort's files (`.endpoints()` their
    addresses), stopped on exit."""
    from twin_pipelines.local_fleet import LocalFleet, SiteLaunch

    launches = [
        SiteLaunch(
            f"site-{i}",
            data=cohort / "sites" / f"site-{i}.csv",
            schema=cohort / "schema.yaml",
        )
        for i in range(1, n_sites + 1)
    ]
    with LocalFleet(root / "sites") as fleet:
        fleet.start(launches, timeout=600)
        yield fleet


def reset_peak_rss() -> int:
    """Reset this process's resident-set high-water mark to its resident set (Linux); return
    the resident set in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss(pid: int) -> int:
    """A process's resident-set high-water mark in bytes (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def endpoints_text(endpoints: dict[str, str]) -> str:
    return ",".join(f"{s}={a}" for s, a in endpoints.items())


def resources(root: Path, endpoints: dict[str, str]) -> dict:
    """The code location's resources (as `resources_from_env` builds them) over these sites,
    with round storage and MLflow (SQLite) under `root`."""
    from twin_pipelines.resources import CohortTruth, GrpcFleet, MlflowRegistry, RoundStore

    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    return {
        "fleet": GrpcFleet(endpoints=endpoints_text(endpoints), insecure=True),
        "store": RoundStore(root=str(root / "rounds")),
        "registry": MlflowRegistry(
            tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
            artifact_root=str(root / "mlflow" / "artifacts"),
        ),
        "truth": CohortTruth(path=""),
    }


def dagster_home(root: Path) -> Path:
    """A DAGSTER_HOME configured as the embedded default's (`TwinHome.ensure_dagster_home`)."""
    from twin_pipelines.home import TwinHome

    return TwinHome(root).ensure_dagster_home()


STEPS = (
    "round_plan",
    "site_updates",
    "global_model",
    "round_evaluation",
    "twin_evaluation",
    "registered_model",
)


@dataclass(frozen=True)
class StepTimes:
    """One run's steps, from its event log: `body` is the asset's own code (from the last
    input event to the first output event), `step` the whole step (start to success)."""

    body: dict[str, float]
    step: dict[str, float]
    first_event: float
    last_event: float


def step_times(instance, run_id: str) -> StepTimes:
    from dagster import DagsterEventType

    entries = instance.all_logs(run_id)
    events = [e for e in entries if e.is_dagster_event and e.step_key]
    starts, inputs, outputs, ends = {}, {}, {}, {}
    for e in events:
        kind, key, t = e.dagster_event.event_type, e.step_key, e.timestamp
        if kind == DagsterEventType.STEP_START:
            starts[key] = t
        elif kind in (DagsterEventType.STEP_INPUT, DagsterEventType.LOADED_INPUT):
            inputs[key] = max(inputs.get(key, t), t)
        elif kind == DagsterEventType.STEP_OUTPUT:
            outputs.setdefault(key, t)
        elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            ends[key] = t
    body = {k: outputs[k] - inputs.get(k, starts[k]) for k in outputs if k in starts}
    step = {k: ends[k] - starts[k] for k in ends if k in starts}
    stamps = [e.timestamp for e in entries]
    return StepTimes(body, step, min(stamps), max(stamps))


def median_of(rows: list[dict[str, float]], key: str) -> float:
    values = sorted(r[key] for r in rows if key in r)
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def quiet_env() -> None:
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "GRPC_VERBOSITY": "NONE",
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
    }.items():
        os.environ.setdefault(key, value)
