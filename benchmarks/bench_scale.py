"""Benchmark 5: whole rounds at scale, through Dagster and gRPC as in production.

Two rounds of the default twin with 1 local epoch at every site:

- 10 sites, one `python -m site_worker` process each (the embedded default's layout);
- 100 virtual sites hosted by 4 worker processes (`site_worker --site-id a,b,..`), each site
  with its own data (simulated_sites: the reference profiles in turn), state and handler.

Each round runs through the code location's assets (plan, data checks, dispatch, aggregation,
evaluation, MLflow registration) in a warm orchestrator process, after one untimed round.
Printed: wall time, CPU time of the orchestrator and of the workers, peak memory of both.

The baseline is the machine's floor for the same round: the sites' own work (the training and
evaluation seconds the sites report, summed) spread over the machine's cores, as if dispatch,
aggregation, Dagster and MLflow cost nothing and the cores were never idle. The ratio says how
far a round is from that floor.
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


def scale_round(
    n_sites: int, n_workers: int, local_epochs: int, root: Path, warm_up: bool = True
) -> dict:
    """Start the workers, run one untimed round (unless not `warm_up`) and one measured round;
    return the figures."""
    import dagster as dg

    from twin_core.cohort import simulated_sites
    from twin_pipelines.campaign import run_round
    from twin_pipelines.config import RoundConfig
    from twin_pipelines.definitions import build_definitions
    from twin_pipelines.local_fleet import LocalFleet, SiteLaunch
    from twin_pipelines.resources import GrpcFleet, MlflowRegistry, RoundStore

    ids = [s.site_id for s in simulated_sites(n_sites)]
    per = -(-n_sites // n_workers)
    launches = [
        SiteLaunch(
            f"worker-{w + 1}",
            synthetic=True,
            cohort_sites=n_sites,
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
    config = RoundConfig(min_sites=n_sites, local_epochs=local_epochs)
    with LocalFleet(root / "sites") as workers, dg.instance_for_test() as instance:
        started = time.perf_counter()
        endpoints = workers.start(launches, timeout=900)
        startup = time.perf_counter() - started
        fleet = GrpcFleet(
            endpoints=",".join(f"{s}={a}" for s, a in endpoints.items()), insecure=True
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
        }


def _result(name: str, f: dict, cores: int) -> Result:
    floor = f["site_seconds"] / cores
    return Result(
        name,
        f["wall"],
        "s",
        None,
        baseline=floor,
        baseline_label=f"sites' own train + evaluate seconds / {cores} cores",
        notes=(
            f"{f['sites']} sites in {f['workers']} worker processes (started in "
            f"{f['startup']:.1f} s): round {f['wall']:.2f} s wall; CPU: orchestrator "
            f"{f['orchestrator_cpu']:.2f} s, workers {f['worker_cpu']:.2f} s (of which the sites' "
            f"own training and evaluation {f['site_seconds']:.2f} s)",
            f"peak memory: orchestrator +{mb(f['orchestrator_peak'] or 0)} resident over the "
            f"round (heap +{mb(f['orchestrator_heap'])}), model {mb(f['model_bytes'])}, "
            f"updates {mb(f['update_bytes'])} in total; workers {mb(f['worker_peak_max'])} "
            f"the largest, {mb(f['worker_peak_sum'])} together",
        ),
    )


def run(quick: bool) -> list[Result]:
    cores = os.cpu_count() or 1
    layouts = (
        [(3, 1, "round, 1 local epoch, 3 virtual sites in 1 worker")]
        if quick
        else [
            (10, 10, "round, 1 local epoch, 10 sites (10 worker processes)"),
            (100, 4, "round, 1 local epoch, 100 virtual sites (4 worker processes)"),
        ]
    )
    results = []
    for n_sites, n_workers, name in layouts:
        with tempfile.TemporaryDirectory(prefix=f"twin-scale-{n_sites}-") as tmp:
            figures = scale_round(n_sites, n_workers, 1, Path(tmp), warm_up=not quick)
        results.append(_result(name, figures, cores))
    return results
