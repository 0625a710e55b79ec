"""Is the federated twin as good as a central one, and better than any site alone? Evidence.

`twin experiment twin --seeds 10` trains the twin three ways on each seeded cohort:
  central    every site's training patients pooled in one place (what federation avoids);
  federated  through the real round pipeline (Dagster assets, MLflow registry, round gates);
  local      each site alone, on its own patients.
Each is evaluated at every site on the same holdout patients, beside the oracle (the generator's
Bayes forecast); the sums add up over sites and seeds. The report checks the acceptance of
reference/twin-model.md and issue 5 and writes `twin.md` and `twin.png`.

Central and local-only training run `epochs` epochs of Adam; the federated twin `rounds` rounds
of `local_steps` Adam steps at every site (or `local_epochs` epochs when local_steps is 0).
Equal steps per site matter: with epochs, the largest site takes 60 times the steps of the
smallest each round and drifts furthest, so FedAvg in effect weighs sites by the square of
their size; the smallest site then fares worse federated than central (1.245 against 1.110
times the oracle over 20 seeds, with 15 rounds of 2 epochs).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twin_core.cohort import CohortConfig, generate_cohort
from twin_core.effects import Z975

ARMS = ("central", "federated", "local")
PLAIN = {"weight_decay": 0.0, "learning_rate": 1e-3, "batch_size": 64}
# FedAvg with sites weighted by the square root of their examples. With weights by examples
# the 20-patient site counts for 1 % of every round and its error stays at 1.205 x the
# oracle's (20 seeds), no better than training alone; with equal weights (seeds 0-9) it drops
# to 1.105 x but the largest site's rises to 1.095 x and pooled coverage falls to 0.835; the
# square root lies between (seeds 0-9: the smallest site 1.128 x, pooled 1.034 x, coverage
# 0.884). (FedProx, mu 1, 8 rounds, 20 seeds: the smallest site's error 1.206 x the oracle's,
# no better, and the twin's counterfactual effect biased by +1.3: the proximal term slows
# learning the arm's effect.)
FEDERATED = {"strategy": "fedavg_sqrt", "proximal_mu": 0.0}


@dataclass
class SeedRun:
    """One seed: each arm's evaluation statistics per site, and the cohort's true effect."""

    seed: int
    true_ate: float
    stats: dict[str, dict[str, dict[str, float]]]  # arm -> site -> statistics
    federated_rounds_passed: int = 0


@dataclass
class Acceptance:
    name: str
    value: str
    passed: bool


@dataclass
class TwinExperiment:
    runs: list[SeedRun]
    settings: dict
    checks: list[Acceptance] = field(default_factory=list)


def _sum(stats: list[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in stats:
        for k, v in s.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _handlers(seed: int):
    from site_worker.handler import SiteHandler
    from twin_core.cohort import cohort_schema
    from twin_core.oracle import Oracle
    from twin_core.schema import check_frame, parse_schema

    cohort = generate_cohort(CohortConfig(seed=seed))
    schema = parse_schema(cohort_schema())
    handlers = {
        s: SiteHandler(
            s,
            schema,
            check_frame(schema, cohort.site(s)),
            oracle=Oracle.from_summary(cohort.summary, s),
        )
        for s in cohort.summary["sites"]
    }
    return cohort, handlers


def _train_config(seed: int, epochs: int):
    from twin_core.federation import TrainConfig

    return TrainConfig(local_epochs=epochs, seed=seed, **PLAIN)


def _evaluate_everywhere(handlers: dict, model) -> dict[str, dict[str, float]]:
    from twin_core.training import evaluate

    return {s: evaluate(h.task, model, h.data.holdout) for s, h in handlers.items()}


def central(handlers: dict, seed: int, epochs: int) -> dict[str, dict[str, float]]:
    """Every site's training patients in one place, trained as one."""
    import torch
    from torch.utils.data import TensorDataset

    from twin_core.federation import pool_moments
    from twin_core.training import train_local

    first = next(iter(handlers.values()))
    task = first.task
    model = task.build_model(pool_moments(h.data.moments for h in handlers.values()), seed)
    tensors = zip(*(h.data.train.tensors for h in handlers.values()), strict=True)
    pooled = TensorDataset(*(torch.cat(parts) for parts in tensors))
    train_local(task, model, pooled, _train_config(seed, epochs))
    return _evaluate_everywhere(handlers, model)


def local(handlers: dict, seed: int, epochs: int) -> dict[str, dict[str, float]]:
    """Each site alone: its own moments, its own patients, evaluated on its own holdout."""
    from twin_core.federation import pool_moments
    from twin_core.training import evaluate, train_local

    out = {}
    for site, h in handlers.items():
        model = h.task.build_model(pool_moments([h.data.moments]), seed)
        train_local(h.task, model, h.data.train, _train_config(seed, epochs))
        out[site] = evaluate(h.task, model, h.data.holdout)
    return out


def federated(
    handlers: dict,
    seed: int,
    rounds: int,
    local_epochs: int,
    workdir: Path,
    settings: Mapping | None = None,
) -> tuple[dict[str, dict[str, float]], int]:
    """Rounds through the real pipeline; the twin is the last candidate that passed its gates
    (the one the registry holds), evaluated at every site."""
    import dagster as dg

    from twin_core.tasks import task_for
    from twin_core.training import load_weights_into
    from twin_pipelines.campaign import run_round
    from twin_pipelines.config import RoundConfig
    from twin_pipelines.definitions import build_definitions
    from twin_pipelines.resources import InProcessFleet, MlflowRegistry, RoundStore

    store = RoundStore(root=str(workdir / f"rounds-{seed}"))
    registry = MlflowRegistry(
        tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
        artifact_root=str(workdir / "artifacts"),
        model_name=f"twin-seed-{seed}",
    )
    defs = build_definitions(fleet=InProcessFleet(handlers), store=store, registry=registry)
    config = RoundConfig(
        local_epochs=local_epochs,
        seed=seed,
        # in-process sites check their data on the first call: slow on a busy machine
        info_timeout_s=120.0,
        **{**PLAIN, **(settings or {})},
    )
    passed = 0
    with dg.DagsterInstance.ephemeral() as instance:
        for _ in range(rounds):
            passed += run_round(defs, instance, config, log_level="ERROR").success
    latest = store.latest_passed()
    if latest is None:
        raise RuntimeError(f"seed {seed}: no federated round passed its gates")
    task = task_for(next(iter(handlers.values())).schema)
    model = task.build_model({}, seed=0)  # the weights carry the standardisation buffers
    load_weights_into(model, store.load(latest["path"]).weights)
    return _evaluate_everywhere(handlers, model), passed


def run_seed(
    seed: int, rounds: int, local_epochs: int, workdir: Path, local_steps: int = 0, epochs: int = 0
) -> SeedRun:
    cohort, handlers = _handlers(seed)
    epochs = epochs or rounds * local_epochs
    settings = {**FEDERATED, "local_steps": local_steps}
    fed, passed = federated(handlers, seed, rounds, local_epochs, workdir, settings)
    stats = {
        "central": central(handlers, seed, epochs),
        "federated": fed,
        "local": local(handlers, seed, epochs),
    }
    return SeedRun(seed, cohort.summary["pooled"]["true_ate"], stats, passed)


# -- reading the runs --------------------------------------------------------------------------
def metrics(task, runs: list[SeedRun], arm: str, site: str | None = None) -> dict[str, float]:
    """An arm's metrics pooled over seeds (and over sites, unless `site`)."""
    parts = [st for r in runs for s, st in r.stats[arm].items() if site is None or s == site]
    return task.metrics(_sum(parts))


def per_seed(task, run: SeedRun, arm: str) -> dict[str, float]:
    return task.metrics(_sum(list(run.stats[arm].values())))


def acceptance(task, runs: list[SeedRun], smallest: str) -> list[Acceptance]:
    fed = metrics(task, runs, "federated")
    cen = metrics(task, runs, "central")
    sites = sorted(runs[0].stats["federated"])
    site_ratio = {s: metrics(task, runs, "federated", s)["mae_h1_vs_oracle"] for s in sites}
    covered = [
        abs(per_seed(task, r, "federated")["procova_ate"] - r.true_ate)
        <= Z975 * per_seed(task, r, "federated")["procova_se"]
        for r in runs
    ]
    ratios = [per_seed(task, r, "federated")["variance_ratio"] for r in runs]
    small_fed = metrics(task, runs, "federated", smallest)["mae_h1"]
    small_local = metrics(task, runs, "local", smallest)["mae_h1"]
    worst = max(site_ratio, key=site_ratio.get)
    return [
        Acceptance(
            "horizon-1 MAE within 10 % of the oracle's, pooled over sites",
            f"{fed['mae_h1_vs_oracle']:.3f} x oracle",
            fed["mae_h1_vs_oracle"] <= 1.10,
        ),
        Acceptance(
            "within 20 % of the oracle at every site",
            f"worst {worst} {site_ratio[worst]:.3f} x",
            max(site_ratio.values()) <= 1.20,
        ),
        Acceptance(
            "90 % interval coverage in [0.85, 0.95] (every horizon)",
            f"{fed['coverage90_all']:.3f}",
            0.85 <= fed["coverage90_all"] <= 0.95,
        ),
        Acceptance(
            "true effect inside the PROCOVA 95 % CI in >= 90 % of seeds",
            f"{sum(covered)}/{len(covered)}",
            sum(covered) >= 0.9 * len(covered),
        ),
        Acceptance(
            "PROCOVA variance ratio < 0.8",
            f"mean {np.mean(ratios):.3f}, max {np.max(ratios):.3f}",
            float(np.max(ratios)) < 0.8,
        ),
        Acceptance(
            "federated pooled MAE within 10 % of central",
            f"{fed['mae_h1'] / cen['mae_h1']:.3f} x central",
            fed["mae_h1"] <= 1.10 * cen["mae_h1"],
        ),
        Acceptance(
            f"smallest site ({smallest}) better federated than alone",
            f"{small_fed:.3f} vs {small_local:.3f}",
            small_fed < small_local,
        ),
    ]


def run(
    seeds: int,
    rounds: int,
    local_epochs: int,
    first_seed: int = 0,
    local_steps: int = 0,
    epochs: int = 0,
) -> TwinExperiment:
    from twin_core.cohort import DEFAULT_SITES, cohort_schema
    from twin_core.schema import parse_schema
    from twin_core.tasks import task_for

    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            run_seed(seed, rounds, local_epochs, Path(tmp), local_steps, epochs)
            for seed in range(first_seed, first_seed + seeds)
        ]
    task = task_for(parse_schema(cohort_schema()))
    smallest = min(DEFAULT_SITES, key=lambda s: s.n_patients).site_id
    settings = {
        "seeds": f"{first_seed}..{first_seed + seeds - 1}",
        "rounds": rounds,
        **({"local_steps": local_steps} if local_steps else {"local_epochs": local_epochs}),
        "epochs (central, local)": epochs or rounds * local_epochs,
        **PLAIN,
        "optimizer": "adam",
        "federated strategy": FEDERATED,
        "holdout": "20 % of each site's patients (hash of the id), the same for every arm",
    }
    experiment = TwinExperiment(runs, settings)
    experiment.checks = acceptance(task, runs, smallest)
    return experiment


# -- the report --------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def report_lines(experiment: TwinExperiment, task, command: str) -> list[str]:
    runs = experiment.runs
    sites = sorted(runs[0].stats["federated"])
    horizon = task.horizon
    lines = [
        "# The twin, three ways: central, federated, each site alone",
        "",
        "![MAE by horizon, per-site error against the oracle, PROCOVA per seed](twin.png)",
        "",
        "## Acceptance (reference/twin-model.md, issue 5), on the federated twin",
        "",
        "| criterion | measured | |",
        "|---|---|---|",
        *(
            f"| {c.name} | {c.value} | {'pass' if c.passed else '**FAIL**'} |"
            for c in experiment.checks
        ),
        "",
        f"## Forecast error by horizon (MAE, pooled over sites and {len(runs)} seeds)",
        "",
        "| | " + " | ".join(f"h{h}" for h in range(1, horizon + 1)) + " | coverage 90 % |",
        "|---" * (horizon + 2) + "|",
    ]
    for arm in ARMS:
        m = metrics(task, runs, arm)
        lines.append(
            f"| {arm} | "
            + " | ".join(_fmt(m.get(f"mae_h{h}")) for h in range(1, horizon + 1))
            + f" | {_fmt(m.get('coverage90_all'))} |"
        )
    m = metrics(task, runs, "federated")
    lines.append(
        "| oracle | "
        + " | ".join(_fmt(m.get(f"oracle_mae_h{h}")) for h in range(1, horizon + 1))
        + " | |"
    )
    lines.append(
        "| last value | "
        + " | ".join(_fmt(m.get(f"naive_mae_h{h}")) for h in range(1, horizon + 1))
        + " | |"
    )
    for label, key in (
        ("federated, from baseline", "baseline_mae"),
        ("oracle, from baseline", "oracle_baseline_mae"),
    ):
        lines.append(
            f"| {label} | "
            + " | ".join(_fmt(m.get(f"{key}_h{h}")) for h in range(1, horizon + 1))
            + " | |"
        )
    lines += [
        "",
        "Horizon h: h visits ahead of every observed visit, from the visits seen so far; "
        "*from baseline*: visit h forecast from the baseline visit alone.",
    ]
    lines += [
        "",
        "## Horizon-1 MAE at each site, as a multiple of the oracle's (pooled over seeds)",
        "",
        "| | " + " | ".join(sites) + " | pooled |",
        "|---" * (len(sites) + 2) + "|",
    ]
    for arm in ARMS:
        cells = [_fmt(metrics(task, runs, arm, s).get("mae_h1_vs_oracle")) for s in sites]
        pooled = _fmt(metrics(task, runs, arm).get("mae_h1_vs_oracle"))
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {pooled} |")
    floors = [_fmt(metrics(task, runs, "federated", s).get("noise_floor")) for s in sites]
    oracle = [
        _fmt(
            metrics(task, runs, "federated", s)["oracle_mae_h1"]
            / metrics(task, runs, "federated", s)["noise_floor"]
        )
        for s in sites
    ]
    lines += [
        "| noise floor (MAE) | " + " | ".join(floors) + " | |",
        "| oracle / noise floor | " + " | ".join(oracle) + " | |",
        "",
        "## Treatment effect at the last visit (pooled ATE, per seed)",
        "",
        "| seed | truth | arm | PROCOVA (95 % CI) | covers | unadjusted +- SE "
        "| variance ratio | twin counterfactual |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for arm in ARMS[:2]:
            m = per_seed(task, r, arm)
            low = m["procova_ate"] - Z975 * m["procova_se"]
            high = m["procova_ate"] + Z975 * m["procova_se"]
            lines.append(
                f"| {r.seed} | {r.true_ate:.2f} | {arm} | {m['procova_ate']:.3f} "
                f"({low:.3f} to {high:.3f}) | {'yes' if low <= r.true_ate <= high else 'no'} "
                f"| {m['unadjusted_ate']:.3f} +- {m['unadjusted_se']:.3f} "
                f"| {m['variance_ratio']:.3f} | {m['twin_ate']:.3f} |"
            )
    biases = {
        arm: [per_seed(task, r, arm)["procova_ate"] - r.true_ate for r in runs] for arm in ARMS[:2]
    }
    twin_bias = [per_seed(task, r, "federated")["twin_ate"] - r.true_ate for r in runs]
    lines += [
        "",
        "Mean bias over seeds (estimate - truth): "
        + ", ".join(
            f"PROCOVA {arm} {np.mean(b):+.3f} (SD {np.std(b, ddof=1):.3f})"
            for arm, b in biases.items()
        )
        + f", federated twin's counterfactual {np.mean(twin_bias):+.3f} "
        f"(SD {np.std(twin_bias, ddof=1):.3f}).",
        "",
        "PROCOVA is estimated on each site's holdout patients still observed at the last visit "
        "(the trial's completers), from sums the sites return; the prognostic score is the "
        "federated (or central) control twin's forecast from baseline. Local-only models give "
        "no pooled effect (each site's holdout is too small).",
        "",
        "## Settings",
        "",
        *(f"- {k}: {v}" for k, v in experiment.settings.items()),
        "- federated rounds that passed their gates: "
        + ", ".join(f"seed {r.seed}: {r.federated_rounds_passed}" for r in runs),
        "- cohort: reference/twin-model.md defaults (5 sites, 1,830 patients, true ATE -2.4)",
        f"- command: `{command}`",
    ]
    return lines


def plot(experiment: TwinExperiment, task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = experiment.runs
    sites = sorted(runs[0].stats["federated"])
    horizons = range(1, task.horizon + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm in ARMS:
        m = metrics(task, runs, arm)
        axes[0].plot(horizons, [m[f"mae_h{h}"] for h in horizons], marker="o", label=arm)
    m = metrics(task, runs, "federated")
    axes[0].plot(horizons, [m[f"oracle_mae_h{h}"] for h in horizons], "k--", label="oracle")
    axes[0].plot(horizons, [m[f"naive_mae_h{h}"] for h in horizons], "k:", label="last value")
    axes[0].set(xlabel="horizon (visits ahead)", ylabel="MAE", title="error by horizon")
    axes[0].legend(fontsize=7)
    width = 0.27
    for i, arm in enumerate(ARMS):
        values = [metrics(task, runs, arm, s)["mae_h1_vs_oracle"] for s in sites]
        axes[1].bar(np.arange(len(sites)) + (i - 1) * width, values, width, label=arm)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].axhline(1.2, color="r", lw=0.8, ls="--", label="1.2 x oracle")
    axes[1].set_xticks(range(len(sites)), sites, fontsize=7)
    axes[1].set(ylabel="horizon-1 MAE / oracle", title="each site")
    axes[1].legend(fontsize=7)
    for j, r in enumerate(runs):
        m = per_seed(task, r, "federated")
        axes[2].errorbar(
            j, m["procova_ate"], yerr=Z975 * m["procova_se"], fmt="o", color="tab:blue"
        )
        axes[2].plot(j + 0.2, m["unadjusted_ate"], "x", color="grey")
    axes[2].axhline(runs[0].true_ate, color="r", lw=1, label="true ATE")
    axes[2].set(xlabel="seed", ylabel="ATE at the last visit", title="PROCOVA 95 % CI (x: raw)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(
    seeds: int, rounds: int, local_epochs: int, out: Path, local_steps: int = 0, epochs: int = 0
) -> Path:
    from twin_core.cohort import cohort_schema
    from twin_core.schema import parse_schema
    from twin_core.tasks import task_for

    experiment = run(seeds, rounds, local_epochs, local_steps=local_steps, epochs=epochs)
    task = task_for(parse_schema(cohort_schema()))
    out.mkdir(parents=True, exist_ok=True)
    plot(experiment, task, out / "twin.png")
    budget = f"--local-steps {local_steps}" if local_steps else f"--local-epochs {local_epochs}"
    command = f"twin experiment twin --seeds {seeds} --rounds {rounds} {budget}" + (
        f" --epochs {epochs}" if epochs else ""
    )
    path = out / "twin.md"
    path.write_text("\n".join(report_lines(experiment, task, command)) + "\n")
    return path
