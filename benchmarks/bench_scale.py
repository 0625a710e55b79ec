"""Benchmark 5: whole rounds at scale, through Dagster and gRPC as in production.

Two rounds of the default twin with 1 local epoch at every site:

- 10 sites, one `python -m site_worker` process each (the embedded default's layout);
- 100 virtual sites hosted by 4 worker processes (`site_worker --site-id a,b,..`), each site
  with its own data (simulated_sites: the reference profiles in turn), state and handler.

Each round runs through the code location's assets (plan, data checks, dispatch, aggregation,
evaluation, MLflow registration) in a warm orchestrator process, after one untimed round.
Printed: wall time, CPU time of the orchestrator and of the workers, peak memory of both.

The baseline is the machine's floor for the same round: the CPU time the site workers spent
on it, spread over the machine's cores, as if dispatch, aggregation, Dagster and MLflow cost
the orchestrator nothing and the cores were never idle. The ratio says how far a round is from
that floor. (The training and evaluation seconds the sites journal are printed too; they are
wall-clock inside each call and overstate the work when many sites share two cores.)
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.harness import PeakMemory, Result, mb

ORDER = 5
TITLE = "rounds at scale: 10 sites, 100 virtual sites"
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _site_seconds(workers, round_key: str) -> float:
    """Training and evaluation seconds the sites journaled for this round (their own work)."""
    total = 0.0
    for site in workers.sites.values():
        journal = site.state_dir / "journal.jsonl"
        for line in journal.read_text().splitlines() if journal.exists() else ():
            entry = json.loads(line)
            if entry.get("round") == round_key and entry.get("kind") in ("train", "evaluate"):
                total += float(entry.get("seconds", 0.0))
    return total


def _cohort(root: Path, n_sites: int, hidden: tuple[int, ...] | None) -> Path:
    """The simulated cohort of `n_sites` as site files, its schema declaring `hidden` (the
    twin's MLP widths: the model's size) if given."""
    import yaml

    from twin_core.cohort import CohortConfig, generate_cohort, simulated_sites, write_cohort

    folder = root / "cohort"
    write_cohort(generate_cohort(CohortConfig(seed=7, sites=simulated_sites(n_sites))), folder)
    if hidden:
        schema = yaml.safe_load((folder / "schema.yaml").read_text())
        schema["hidden"] = list(hidden)
        (folder / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    return folder


def scale_round(
    n_sites: int,
    n_workers: int,
    root: Path,
    *,
    local_epochs: int = 1,
    local_steps: int = 0,
    hidden: tuple[int, ...] | None = None,
    receive_slots: int = 8,
    warm_up: bool = True,
) -> dict:
    """Start the workers, run one untimed round (unless not `warm_up`) and one measured round;
    return the figures."""
    import dagster as dg

    from twin_core.cohort import simulated_sites
    from twin_pipelines.campaign import run_round
    from twin_pipelines.config import RoundConfig
    from twin_pipelines.definitions import build_definitions
    from twin_pipelines.home import TwinHome
    from twin_pipelines.local_fleet import LocalFleet, SiteLaunch
    from twin_pipelines.resources import GrpcFleet, MlflowRegistry, RoundStore

    cohort = _cohort(root, n_sites, hidden)
    ids = [s.site_id for s in simulated_sites(n_sites)]
    per = -(-n_sites // n_workers)
    launches = [
        SiteLaunch(
            f"worker-{w + 1}",
            data=cohort / "sites" / "{site}.csv",
            schema=cohort / "schema.yaml",
            sites=tuple(ids[w * per : (w + 1) * per]),
        )
        for w in range(n_workers)
        if ids[w * per : (w + 1) * per]
    ]
    store = RoundStore(root=str(root / "rounds"))
    registry = MlflowRegistry(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifact_root=str(root / "artifacts"),
        model_name=f"scale-{n_sites}",
    )
    config = RoundConfig(min_sites=n_sites, local_epochs=local_epochs, local_steps=local_steps)
    # the embedded default's on-disk instance, as `twin demo` runs rounds
    home = TwinHome(root / "twin").ensure_dagster_home()
    with (
        LocalFleet(root / "sites") as workers,
        dg.DagsterInstance.from_config(str(home)) as instance,
    ):
        started = time.perf_counter()
        endpoints = workers.start(launches, timeout=900)
        startup = time.perf_counter() - started
        fleet = GrpcFleet(
            endpoints=",".join(f"{s}={a}" for s, a in endpoints.items()),
            insecure=True,
            receive_slots=receive_slots,
        )
        defs = build_definitions(fleet=fleet, store=store, registry=registry)
        warm = run_round(defs, instance, config, log_level="ERROR") if warm_up else None
        if warm is not None and not warm.success:
            raise RuntimeError(f"{n_sites} sites: the warm-up round failed: {warm.error}")
        pids = [p.pid for p in workers.workers()]
        cpu_before = {pid: _cpu_seconds(pid) for pid in pids}
        own_before = _own_cpu()
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            result = run_round(defs, instance, config, log_level="ERROR")
            wall = time.perf_counter() - t0
        if not result.success or result.failed_sites:
            raise RuntimeError(
                f"{n_sites} sites: round failed ({result.error}; failed: {result.failed_sites})"
            )
        worker_cpu = sum(_cpu_seconds(pid) - cpu_before[pid] for pid in pids)
        updates = list((store.round_dir(result.round_key) / "updates").glob("*.twt"))
        return {
            "sites": n_sites,
            "workers": len(pids),
            "startup": startup,
            "wall": wall,
            "orchestrator_cpu": _own_cpu() - own_before,
            "worker_cpu": worker_cpu,
            "site_seconds": _site_seconds(workers, result.round_key),
            "orchestrator_peak": peak.rss,
            "orchestrator_heap": peak.heap,
            "worker_peak_max": max(_peak_rss(pid) for pid in pids),
            "worker_peak_sum": sum(_peak_rss(pid) for pid in pids),
            "update_bytes": sum(p.stat().st_size for p in updates),
            "model_bytes": updates[0].stat().st_size if updates else 0,
            "slots_peak": fleet.slots().peak,
            "receive_slots": receive_slots,
        }


def _result(name: str, f: dict, cores: int) -> Result:
    floor = f["worker_cpu"] / cores
    return Result(
        name,
        f["wall"],
        "s",
        None,
        baseline=floor,
        baseline_label=f"site workers' CPU seconds / {cores} cores",
        notes=(
            f"{f['sites']} sites in {f['workers']} worker processes (started in "
            f"{f['startup']:.1f} s): round {f['wall']:.2f} s wall; CPU: orchestrator "
            f"{f['orchestrator_cpu']:.2f} s, workers {f['worker_cpu']:.2f} s; the sites journaled "
            f"{f['site_seconds']:.2f} s of training and evaluation (wall-clock in each call)",
            f"peak memory: orchestrator +{mb(f['orchestrator_peak'] or 0)} resident over the "
            f"round (heap +{mb(f['orchestrator_heap'])}), model {mb(f['model_bytes'])}, "
            f"updates {mb(f['update_bytes'])} in total; workers {mb(f['worker_peak_max'])} "
            f"the largest, {mb(f['worker_peak_sum'])} together",
        ),
    )


def _memory_result(name: str, f: dict) -> Result:
    return Result(
        name,
        f["orchestrator_heap"] / 1e6,
        "MB",
        None,
        baseline=f["model_bytes"] / 1e6,
        baseline_label="one model",
        notes=(
            f"{f['sites']} sites in {f['workers']} workers, model {mb(f['model_bytes'])}, "
            f"{f['receive_slots']} receive slots (at most {f['slots_peak']} updates held at "
            f"once): orchestrator heap peak +{mb(f['orchestrator_heap'])} over the round, "
            f"resident +{mb(f['orchestrator_peak'] or 0)}; updates {mb(f['update_bytes'])} "
            f"in total; round {f['wall']:.1f} s",
        ),
    )


def run(quick: bool) -> list[Result]:
    cores = os.cpu_count() or 1
    if quick:
        with tempfile.TemporaryDirectory(prefix="twin-scale-") as tmp:
            f = scale_round(3, 1, Path(tmp), warm_up=False, receive_slots=1)
        # a cold round (no warm-up): its memory is mostly first imports, so no memory row
        return [_result("round, 1 local epoch, 3 virtual sites in 1 worker", f, cores)]
    results = []
    for n_sites, n_workers, name in (
        (10, 10, "round, 1 local epoch, 10 sites (10 worker processes)"),
        (100, 4, "round, 1 local epoch, 100 virtual sites (4 worker processes)"),
    ):
        with tempfile.TemporaryDirectory(prefix=f"twin-scale-{n_sites}-") as tmp:
            results.append(_result(name, scale_round(n_sites, n_workers, Path(tmp)), cores))
    # peak memory against the number of sites: a 2.6 M-parameter twin (10 MB), one local step
    for n_sites in (10, 40):
        with tempfile.TemporaryDirectory(prefix=f"twin-memory-{n_sites}-") as tmp:
            f = scale_round(
                n_sites, 2, Path(tmp), local_epochs=0, local_steps=1, hidden=(1600, 1600)
            )
        results.append(
            _memory_result(f"orchestrator heap peak, {n_sites} virtual sites, 10 MB twin", f)
        )
    return results
