"""Re-runnable evidence: campaigns on the synthetic cohort comparing strategies, written as a
markdown report with PNG plots. `twin experiment heterogeneity|poisoned --out docs/experiments`.

Sites run in-process (SiteHandler, the same code as a site worker) and every round goes through
the real round assets, a Dagster instance and an MLflow store, so the figures are the pipeline's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from twin_core.cohort import DEFAULT_SITES, CohortConfig, cohort_schema, generate_cohort
from twin_core.federation import SiteUpdate, TrainConfig

HETEROGENEOUS_SITES = tuple(
    replace(s, severity_shift=2 * s.severity_shift, calibration_bias=2 * s.calibration_bias)
    for s in DEFAULT_SITES
)


class StragglerSite:
    """A site that manages only `epochs` local epochs whatever it is asked (a slow hospital);
    it reports the steps it did, so aggregation counts its partial work."""

    def __init__(self, inner, epochs: int = 1) -> None:
        self.inner, self.site_id, self.epochs = inner, inner.site_id, epochs

    def info(self, timeout):
        return self.inner.info(timeout)

    def evaluate(self, *args, **kwargs):
        return self.inner.evaluate(*args, **kwargs)

    def train(self, round_key, fingerprint, config: TrainConfig, weights, timeout=None):
        short = replace(config, local_epochs=min(config.local_epochs, self.epochs))
        return self.inner.train(round_key, fingerprint, short, weights, timeout)


class SignFlipSite:
    """A poisoned site: it trains, then sends its change scaled by `scale` (-10: sign-flipped)."""

    def __init__(self, inner, scale: float = -10.0) -> None:
        self.inner, self.site_id, self.scale = inner, inner.site_id, scale

    def info(self, timeout):
        return self.inner.info(timeout)

    def evaluate(self, *args, **kwargs):
        return self.inner.evaluate(*args, **kwargs)

    def train(self, round_key, fingerprint, config, weights, timeout=None) -> SiteUpdate:
        update = self.inner.train(round_key, fingerprint, config, weights, timeout)
        poisoned = {
            k: (weights[k] + self.scale * (v - weights[k])).astype(v.dtype)
            if v.dtype.kind == "f"
            else v
            for k, v in update.weights.items()
        }
        return replace(update, weights=poisoned)


def site_handlers(config: CohortConfig, oracle: bool = False) -> dict:
    """In-process sites of the cohort `config` describes; with `oracle`, each also holds the
    generator's Bayes forecast for its patients, so evaluation reports the twin's error
    against it (mae_h1_vs_oracle and the oracle_* statistics)."""
    from site_worker.handler import SiteHandler
    from twin_core.oracle import Oracle
    from twin_core.schema import check_frame, parse_schema

    cohort = generate_cohort(config)
    schema = parse_schema(cohort_schema(config.params))
    return {
        s.site_id: SiteHandler(
            s.site_id,
            schema,
            check_frame(schema, cohort.site(s.site_id)),
            oracle=Oracle.from_summary(cohort.summary, s.site_id) if oracle else None,
        )
        for s in config.sites
    }


@dataclass(frozen=True)
class Curve:
    """One campaign: pooled and per-site validation loss after every round."""

    label: str
    pooled: list[float]
    per_site: dict[str, list[float]]


def run_arm(label: str, fleet: dict, rounds: int, settings: dict, workdir: Path) -> Curve:
    """A campaign of `rounds` rounds with round config `settings`, in its own stores."""
    import dagster as dg

    from twin_pipelines.campaign import run_round
    from twin_pipelines.config import RoundConfig
    from twin_pipelines.definitions import build_definitions
    from twin_pipelines.resources import InProcessFleet, MlflowRegistry, RoundStore

    root = workdir / label
    registry = MlflowRegistry(
        tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
        artifact_root=str(workdir / "artifacts"),
        model_name=f"exp-{label}",
    )
    defs = build_definitions(
        fleet=InProcessFleet(fleet), store=RoundStore(root=str(root)), registry=registry
    )
    config = RoundConfig(**settings)
    pooled, per_site = [], {}
    with dg.DagsterInstance.ephemeral() as instance:
        for _ in range(rounds):
            result = run_round(defs, instance, config, log_level="ERROR")
            if not result.success and not result.pooled:
                raise RuntimeError(f"{label}: {result.error}")
            evaluation = RoundStore(root=str(root)).read_json(result.round_key, "evaluation.json")
            pooled.append(evaluation["pooled"]["loss"])
            for site, metrics in evaluation["per_site"].items():
                per_site.setdefault(site, []).append(metrics["loss"])
    return Curve(label, pooled, per_site)


def _plot(curves: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({s for c in curves for s in c.per_site})
    fig, axes = plt.subplots(1, 1 + len(sites), figsize=(3.2 * (1 + len(sites)), 3.2), sharey=False)
    for curve in curves:
        rounds = range(1, len(curve.pooled) + 1)
        axes[0].plot(rounds, curve.pooled, marker="o", label=curve.label)
        for ax, site in zip(axes[1:], sites, strict=True):
            ax.plot(rounds, curve.per_site.get(site, []), marker=".", label=curve.label)
    axes[0].set_title("pooled")
    for ax, site in zip(axes[1:], sites, strict=True):
        ax.set_title(site)
    for ax in axes:
        ax.set_xlabel("round")
    axes[0].set_ylabel("validation loss (NLL)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(curves: list[Curve]) -> list[str]:
    sites = sorted({s for c in curves for s in c.per_site})
    lines = [
        "| strategy | pooled, round 1 | pooled, final | " + " | ".join(sites) + " |",
        "|---" * (3 + len(sites)) + "|",
    ]
    for c in curves:
        finals = " | ".join(f"{c.per_site[s][-1]:.4f}" for s in sites)
        lines.append(f"| {c.label} | {c.pooled[0]:.4f} | {c.pooled[-1]:.4f} | {finals} |")
    return lines


HETEROGENEITY_ARMS = {
    "FedAvg": {"strategy": "fedavg"},
    "FedProx (mu 1)": {"strategy": "fedavg", "proximal_mu": 1.0},
    "FedAdam": {"strategy": "fedadam", "server_lr": 3e-3},
    "FedAvg (SGD)": {"strategy": "fedavg", "optimizer": "sgd", "learning_rate": 0.01},
    "SCAFFOLD (SGD)": {"strategy": "scaffold", "optimizer": "sgd", "learning_rate": 0.01},
}
# aggressive local training (8 epochs), where client drift on non-IID data shows
HETEROGENEITY_LOCAL = {"local_epochs": 8, "learning_rate": 3e-3}
POISONED_ARMS = {
    "FedAvg": {"strategy": "fedavg"},
    "median": {"strategy": "median"},
    "trimmed mean (0.2)": {"strategy": "trimmed_mean", "trim_fraction": 0.2},
    "multi-Krum (f 1, m 2)": {"strategy": "multi_krum", "krum_f": 1, "krum_m": 2},
}
COMMON = {"min_sites": 3, "local_epochs": 3, "regression_tolerance": 1e9, "max_update_norm": 1e9}
STRAGGLERS = ("site-4", "site-5")
POISONED_SITE = "site-4"


def heterogeneity(rounds: int, seed: int, workdir: Path) -> tuple[list[Curve], dict]:
    """FedAvg, FedProx, FedAdam and SCAFFOLD (with its SGD baseline) on an amplified non-IID
    cohort, 8 local epochs, two stragglers that do only 1."""
    curves = []
    for label, settings in HETEROGENEITY_ARMS.items():
        handlers = site_handlers(CohortConfig(seed=seed, sites=HETEROGENEOUS_SITES))
        fleet = {s: StragglerSite(h) if s in STRAGGLERS else h for s, h in handlers.items()}
        merged = {**COMMON, **HETEROGENEITY_LOCAL, "seed": seed, **settings}
        curves.append(replace(run_arm(_slug(label), fleet, rounds, merged, workdir), label=label))
    settings = {
        "rounds": rounds,
        "seed": seed,
        "stragglers (1 local epoch)": STRAGGLERS,
        **COMMON,
        **HETEROGENEITY_LOCAL,
    }
    return curves, {**settings, "per-arm overrides": HETEROGENEITY_ARMS}


def _slug(label: str) -> str:
    """A distinct store and model name per arm."""
    return "".join(ch for ch in label.lower() if ch.isalnum())


def poisoned(rounds: int, seed: int, workdir: Path) -> tuple[list[Curve], dict]:
    """Each strategy twice, without and with one sign-flipped, x10 site."""
    curves = []
    for label, settings in POISONED_ARMS.items():
        for attacked in (False, True):
            handlers = site_handlers(CohortConfig(seed=seed))
            if attacked:
                handlers[POISONED_SITE] = SignFlipSite(handlers[POISONED_SITE])
            name = f"{label}, {'attacked' if attacked else 'clean'}"
            merged = {**COMMON, "seed": seed, **settings}
            curves.append(
                replace(run_arm(_slug(name), handlers, rounds, merged, workdir), label=name)
            )
    settings = {
        "rounds": rounds,
        "seed": seed,
        "poisoned_site": POISONED_SITE,
        "attack": "update change x -10",
        **COMMON,
    }
    return curves, {**settings, "per-arm overrides": POISONED_ARMS}


def attack_effects(curves: list[Curve]) -> dict[str, float]:
    """Per strategy: relative change of the final pooled loss when one site is poisoned."""
    final = {c.label: c.pooled[-1] for c in curves}
    return {
        label: relative_gap(final[f"{label}, attacked"], final[f"{label}, clean"])
        for label in POISONED_ARMS
        if f"{label}, clean" in final and f"{label}, attacked" in final
    }


def write_report(kind: str, rounds: int, seed: int, out: Path) -> Path:
    """Run one experiment and write `<kind>.md` and `<kind>.png` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = heterogeneity if kind == "heterogeneity" else poisoned
        curves, settings = run(rounds, seed, Path(tmp))
    title = {
        "heterogeneity": "Strong heterogeneity with stragglers",
        "poisoned": "One poisoned site",
    }[kind]
    _plot(curves, out / f"{kind}.png", title)
    ranking = sorted(curves, key=lambda c: c.pooled[-1])
    best_first = ", ".join(f"{c.label} {c.pooled[-1]:.4f}" for c in ranking)
    lines = [
        f"# {title}",
        "",
        f"![pooled and per-site loss per round]({kind}.png)",
        "",
        *_table(curves),
        "",
        f"Final pooled loss, best first: {best_first}.",
        "",
        *(
            [
                "Effect of the attack on each strategy's final pooled loss: "
                + ", ".join(f"{k} {v:+.1%}" for k, v in attack_effects(curves).items())
                + ".",
                "",
            ]
            if kind == "poisoned"
            else []
        ),
        "## Settings",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += [
        "- cohort: twin-model.md defaults"
        + (
            ", severity shift and calibration bias of every site doubled"
            if kind == "heterogeneity"
            else ""
        ),
        f"- command: `twin experiment {kind} --rounds {rounds} --seed {seed}`",
        "- loss: pooled validation NLL of each round's candidate on the sites' holdout splits",
        "- gates relaxed (regression tolerance and update-norm bound off) so that each "
        "strategy's own trajectory is shown",
    ]
    path = out / f"{kind}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def relative_gap(a: float, b: float) -> float:
    return float(abs(a - b) / max(abs(b), 1e-12))
