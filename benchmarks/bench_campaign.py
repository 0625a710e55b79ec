"""Benchmark 6: rounds per minute of a campaign, and how the model's size changes it.

A campaign (`campaign.run_campaign`: rounds chained in this process, each one Dagster run of
`fl_round_job` on an on-disk instance configured as the embedded default's) over 4 real
`python -m site_worker` processes on localhost gRPC (200 patients each), with the patient twin
at about 100 k, 5 M and 50 M parameters (schema `hidden` widths; the actual counts are in the
table). Every site trains 5 Adam steps per round (`local_steps: 5`, batch 64), so local
compute stays small and the figure shows what moving, checking, storing, evaluating and
registering a model of that size costs (the regression gate is opened so that every round
registers: at 50 M parameters the loss rises and the gate would stop the campaign). The process
is warmed by one untimed round first; the figure is the campaign's rounds divided by its wall
time. At 50 M parameters the campaign has 2 rounds (about 2 minutes each here).

The baseline is the same rounds' gRPC calls alone from the same process (GetInfo, Train with
the same config, Evaluate at every site; each stage concurrent), in rounds per minute; the
ratio is the share of that rate the pipeline keeps. The issue sets no target for this row.

Memory is each process's resident-set high-water mark: the orchestrator (this process, above
its resident set when the campaign starts; the mark reset then) and the largest site worker
(since its start).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import rounds_env as env
from benchmarks.harness import Result, mb, median

ORDER = 6
TITLE = "campaign throughput by model size"
SITES, PATIENTS, LOCAL_STEPS = 4, 200, 5
# (size, rounds timed): 50 M parameters (200 MB of float32) runs 2 rounds (about 2 min each here)
FULL = (("100k", 20), ("5M", 20), ("50M", 2))
QUICK = (("quick", 1),)
QUICK_HIDDEN = [32, 32]


def _case(size: str, rounds: int, quick: bool) -> Result:
    import dagster as dg

    from benchmarks.bench_round_overhead import grpc_calls_alone
    from twin_pipelines.campaign import run_campaign, run_round
    from twin_pipelines.config import RoundConfig
    from twin_pipelines.definitions import build_definitions

    n_sites = 2 if quick else SITES
    hidden = QUICK_HIDDEN if quick else env.HIDDEN[size]
    # the regression gate always passes: every round registers, whatever the loss does (at
    # 50 M parameters Adam's default step makes the pooled loss rise, and the gate would stop
    # the campaign; what is measured here is the cost of a round, not learning)
    config = RoundConfig(
        local_steps=LOCAL_STEPS,
        min_sites=n_sites,
        secure_aggregation=False,
        seed=7,
        regression_tolerance=1e6,
    )
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp:
        root = Path(tmp)
        cohort = env.write_cohort(root / "cohort", n_sites, 40 if quick else PATIENTS, hidden)
        params = env.parameter_count(cohort)
        start = env.initial_weights(cohort)
        with env.site_fleet(root, cohort, n_sites) as fleet:
            resources = env.resources(root, fleet.endpoints())
            defs = build_definitions(**resources)
            home = env.dagster_home(root / "twin")
            instance = (  # quick: in memory, a smoke run
                dg.DagsterInstance.ephemeral()
                if quick
                else dg.DagsterInstance.from_config(str(home))
            )
            with instance:
                if not quick:  # first uses (MLflow, the sites' first step) out of the figure
                    warm = run_round(defs, instance, config, log_level="WARNING")
                    if not warm.success:
                        raise RuntimeError(f"{size}: warm-up round failed: {warm.error}")
                    grpc_calls_alone(resources["fleet"], config, start, "warm-baseline")
                rss_start = env.reset_peak_rss()
                began = time.perf_counter()
                outcome = run_campaign(defs, instance, rounds, config, log_level="WARNING")
                seconds = time.perf_counter() - began
                orchestrator_peak = env.peak_rss(os.getpid()) - rss_start
                failed = [r for r in outcome if not r.success]
                if failed or len(outcome) != rounds:
                    raise RuntimeError(
                        f"{size}: campaign stopped after {len(outcome)} round(s): "
                        + "; ".join(r.error for r in failed)
                    )
                baseline_s = []
                for i in range(min(rounds, 3)):
                    began = time.perf_counter()
                    grpc_calls_alone(resources["fleet"], config, start, f"baseline-{i}")
                    baseline_s.append(time.perf_counter() - began)
            site_peak = max(env.peak_rss(s.process.pid) for s in fleet.sites.values())
    per_round = seconds / rounds
    model_bytes = sum(w.nbytes for w in start.values())
    label = f"{params / 1e6:.1f} M" if params >= 1e6 else f"{params / 1e3:,.0f} k"
    return Result(
        benchmark=f"campaign, {n_sites} sites, {label} params ({rounds} rounds)",
        figure=60.0 / per_round,
        unit="rounds/min",
        target=None,
        baseline=60.0 / median(baseline_s),
        baseline_label="the rounds' gRPC calls alone",
        notes=(
            f"{params:,} parameters ({mb(model_bytes)} float32), {n_sites} site worker "
            f"processes, local_steps {LOCAL_STEPS}; {rounds} rounds in {seconds:.1f} s = "
            f"{per_round:.2f} s per round; the gRPC calls alone {median(baseline_s):.2f} s "
            f"per round (median of {len(baseline_s)})",
            f"peak memory: orchestrator resident set +{mb(orchestrator_peak)} during the "
            f"campaign, the largest site worker {mb(site_peak)}",
        ),
    )


def run(quick: bool) -> list[Result]:
    env.quiet_env()
    results = []
    for size, rounds in QUICK if quick else FULL:
        try:
            results.append(_case(size, rounds, quick))
        except Exception:  # one size failing must not hide the others' figures
            if quick:
                raise
            print(f"bench_campaign {size} failed:\n{traceback.format_exc()}", file=sys.stderr)
    if not results:
        raise RuntimeError("every campaign failed (see above)")
    return results
