"""Benchmark 3: what one round costs beyond its site calls, end to end through Dagster.

A round over 10 real `python -m site_worker` processes (LocalFleet, as the demo starts them)
on localhost gRPC, each serving 200 patients of the seeded synthetic cohort, with a patient twin
of about 100 k parameters (schema `hidden: [300, 300]`: 101,723 parameters). The orchestrator
is this process, warm: the round is `campaign.run_round` (one Dagster run of `fl_round_job`,
in-process, on a new `fl_round` partition) over the code location's own resources (GrpcFleet,
RoundStore, MlflowRegistry on SQLite), on an on-disk Dagster instance configured as the
embedded default's (`TwinHome.ensure_dagster_home`), as `twin demo` runs it. Two rows: no local
training (`local_epochs: 0`, which the config allows: the site returns the model it received)
and 1 local epoch.

The baseline is the same round's gRPC calls alone, from the same process over the same
channels: GetInfo, Train (same config, same start model) and Evaluate at every site, each
stage concurrent as the round's assets do it; no Dagster, no round storage, no MLflow. It is
what any orchestrator of this fleet must wait for; the ratio is the round's multiple of it.

The breakdown comes from each run's Dagster event log: an asset's own time runs from its last
input event to its first output event (dispatch: `site_updates`; aggregation: `global_model`;
evaluation: `round_evaluation`, and `twin_evaluation`'s report and figure apart; MLflow:
`registered_model`); the Dagster run overhead is the round's wall time minus every asset's own
time (run start and end, step events, input and output handling, asset checks, storage).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks import rounds_env as env
from benchmarks.harness import Result, Target, interleaved, median

ORDER = 3
TITLE = "per-round overhead through Dagster"
TARGETS = {0: Target("figure", "<=", 0.5), 1: Target("figure", "<=", 0.8)}
SITES, PATIENTS = 10, 200
QUICK_SITES, QUICK_HIDDEN = 2, [32, 32]


def grpc_calls_alone(fleet, config, weights, key: str) -> None:
    """The round's site calls without the pipeline: info, train, evaluate at every site."""
    from twin_core.dispatch import run_on_sites, split_failures

    sites = fleet.sites()
    infos = run_on_sites(
        sites,
        lambda s: s.info(config.info_timeout_s),
        stage="info",
        timeout=config.info_timeout_s + 2,
    )
    fingerprint = next(iter(infos.values())).schema_fingerprint
    stages = (
        (
            "train",
            lambda s: s.train(
                key,
                fingerprint,
                config.train_config(config.seed),
                weights,
                config.train_timeout_s,
            ),
        ),
        ("evaluate", lambda s: s.evaluate(key, fingerprint, weights, config.eval_timeout_s)),
    )
    for stage, call in stages:
        _, failures = split_failures(
            run_on_sites(sites, call, stage=stage, timeout=config.train_timeout_s)
        )
        if failures:
            raise RuntimeError(f"baseline {stage} failed: {failures}")


def _row(
    defs,
    instance,
    start,
    epochs: int,
    repeats: int,
    params: int,
    n_sites: int,
    storage: str,
    warm_up: bool,
) -> Result:
    from twin_pipelines.campaign import run_round
    from twin_pipelines.config import RoundConfig

    config = RoundConfig(local_epochs=epochs, min_sites=n_sites, secure_aggregation=False)
    fleet = defs.resources["fleet"]
    timings: list[dict[str, float]] = []
    counter = iter(range(1, 10_000))

    def subject() -> None:
        start = time.perf_counter()
        result = run_round(defs, instance, config, log_level="WARNING")
        wall = time.perf_counter() - start
        if not result.success:
            raise RuntimeError(f"round {result.round_key} failed: {result.error}")
        steps = env.step_times(instance, result.run_id)
        timings.append({"wall": wall, **steps.body})

    def baseline() -> None:
        grpc_calls_alone(fleet, config, start, f"baseline-{next(counter)}")

    if warm_up:  # one untimed round (first uses: MLflow, the sites' first training step)
        subject()
        baseline()
    subject_s, baseline_s = interleaved(subject, baseline, repeats=repeats, warmup=0)
    timed = timings[-repeats:]
    for row in timed:
        row["dagster"] = row["wall"] - sum(row.get(s, 0.0) for s in env.STEPS)
    part = {k: env.median_of(timed, k) for k in ("dagster", *env.STEPS)}
    label = "no local training" if epochs == 0 else f"{epochs} local epoch"
    figure = median(subject_s)
    notes = [
        f"{n_sites} site worker processes, {params:,} parameters, {label}, {storage} Dagster "
        f"instance; median of {repeats} round(s)"
        + (" after a warm-up round" if warm_up else " (no warm-up: first uses included)")
        + f", spread {min(subject_s):.2f}-{max(subject_s):.2f} s",
        "breakdown (medians, s): Dagster run overhead {dagster:.3f}; plan {round_plan:.3f}; "
        "dispatch (train calls) {site_updates:.3f}; aggregation {global_model:.3f}; "
        "evaluation {round_evaluation:.3f} + twin report and figure {twin_evaluation:.3f}; "
        "MLflow registration {registered_model:.3f}".format(**part),
    ]
    return Result(
        benchmark=f"round, {n_sites} sites x {params / 1e3:,.0f} k params, {label}, {storage}",
        figure=figure,
        unit="s",
        target=TARGETS[epochs],
        baseline=median(baseline_s),
        baseline_label="the round's gRPC calls alone",
        notes=tuple(notes),
    )


def run(quick: bool) -> list[Result]:
    env.quiet_env()
    import dagster as dg

    from twin_pipelines.definitions import build_definitions

    n_sites = QUICK_SITES if quick else SITES
    hidden = QUICK_HIDDEN if quick else env.HIDDEN["100k"]
    repeats = 1 if quick else 7
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        root = Path(tmp)
        cohort = env.write_cohort(root / "cohort", n_sites, 40 if quick else PATIENTS, hidden)
        params = env.parameter_count(cohort)
        with env.site_fleet(root, cohort, n_sites) as fleet:
            resources = env.resources(root, fleet.endpoints())
            defs = build_definitions(**resources)
            home = env.dagster_home(root / "twin")
            # the demo's on-disk instance (both targets), then an in-memory one (what Dagster's
            # storage costs); quick: the in-memory one only
            cases = [("in-memory", 0)] if quick else [("on-disk", 0), ("on-disk", 1)]
            cases += [] if quick else [("in-memory", 0)]
            for storage, epochs in cases:
                instance = (
                    dg.DagsterInstance.from_config(str(home))
                    if storage == "on-disk"
                    else dg.DagsterInstance.ephemeral()
                )
                with instance:
                    results.append(
                        _row(
                            defs,
                            instance,
                            env.initial_weights(cohort),
                            epochs,
                            repeats,
                            params,
                            n_sites,
                            storage,
                            warm_up=not quick,
                        )
                    )
    return results
