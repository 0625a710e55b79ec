"""The cost of privacy, measured: `twin experiment privacy` writes docs/experiments/privacy.md.

One campaign per arm on the same synthetic cohort and seed, through the real round assets (a
Dagster instance, the round store, an MLflow registry) with in-process sites (SiteHandler, the
site worker's code, each holding the generator's oracle so the twin's error is read against
it): plain FedAvg, secure aggregation, patient-level DP-SGD at two noise levels (one of them
with secure aggregation too) and site-level DP-FedAvg. For each arm: the last round's
candidate on every site's holdout (pooled loss, one-visit-ahead MAE and its multiple of the
oracle's, 90 % coverage), the wall time per round against the plain arm's measured in the same
run, and the epsilon each privacy scope spent, from the arm's own ledger.

A micro-benchmark of twin_core.secagg alone (no Dagster) times a site's encode + mask and the
orchestrator's unmask_sum against a plain weighted float64 sum of the same updates.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twin_core.cohort import DEFAULT_SITES, CohortConfig, SiteProfile

PLAIN = "plain FedAvg"
SECURE = "secure aggregation"
CONTROL = "control (one ulp)"
ARMS: dict[str, dict] = {
    PLAIN: {},
    SECURE: {"secure_aggregation": True},
    "DP-SGD z=0.5": {"dpsgd_noise_multiplier": 0.5},
    "DP-SGD z=1.0": {"dpsgd_noise_multiplier": 1.0},
    "DP-SGD z=1.0 + secure aggregation": {
        "dpsgd_noise_multiplier": 1.0,
        "secure_aggregation": True,
    },
    "DP-FedAvg clip 1 z=0.5": {"dp_clip": 1.0, "dp_noise_multiplier": 0.5},
}
# gates relaxed, so that every arm's own trajectory shows (a noisy candidate is still kept)
COMMON = {
    "local_epochs": 2,
    "regression_tolerance": 1e9,
    "site_regression_tolerance": 1e9,
    "max_update_norm": 1e9,
}
DELTA = 1e-5
BENCH_SIZES = (10_000, 100_000, 1_000_000)
BENCH_SITES = 5
BENCH_REPEATS = 5


@dataclass
class ArmResult:
    """One arm's campaign, in plain values."""

    label: str
    settings: dict
    pooled_loss: list[float]  # after every round
    round_seconds: list[float]  # wall time of every round (one Dagster run each)
    rounds_passed: int
    final: dict[str, float]  # pooled metrics of the last round's candidate
    per_site: dict[str, dict[str, float]]  # the same, per site
    epsilon: dict[str, float]  # privacy scope -> epsilon at DELTA, from this arm's ledger
    sample_rate: dict[str, float] = field(default_factory=dict)  # scope -> q of its last event
    dp_steps: dict[str, int] = field(default_factory=dict)  # scope -> noisy steps, all rounds
    model_diff_vs_plain: float = math.nan  # max |w - w_plain| over the final candidates
    diff_by_round: list[float] = field(default_factory=list)  # the same, after every round
    # largest relative change, against plain FedAvg's final model, of the tensors plain
    # FedAvg never changes (the standardisation buffers)
    frozen_drift: float = math.nan
    seconds_ratio: float = math.nan  # mean round time / the plain arm's

    @property
    def mean_seconds(self) -> float:
        return float(np.mean(self.round_seconds))

    @property
    def sd_seconds(self) -> float:
        return float(np.std(self.round_seconds, ddof=1)) if len(self.round_seconds) > 1 else 0.0


@dataclass
class BenchRow:
    """twin_core.secagg on `sites` updates of `values` float32 values (medians, seconds)."""

    values: int
    sites: int
    plain_sum_s: float  # weighted float64 sum of all the sites' updates
    mask_per_site_s: float  # encode + mask, one site (mean over the sites)
    unmask_s: float  # unmask_sum at the orchestrator (rebuild the seeds, strip the masks)
    max_error: float  # |decoded secure sum - plain sum|, worst value

    @property
    def mask_ratio(self) -> float:
        return self.mask_per_site_s / self.plain_sum_s

    @property
    def unmask_ratio(self) -> float:
        return self.unmask_s / self.plain_sum_s


@dataclass
class PrivacyExperiment:
    arms: list[ArmResult]
    bench: list[BenchRow]
    settings: dict
    smallest: str
    sites: list[str] = field(default_factory=list)
    model_values: int = 0  # floating-point values in the model (what secure aggregation sums)
    frozen: list[str] = field(default_factory=list)  # tensors no plain round changed
    # plain FedAvg with one float32 ulp added to the largest site's first update: max |w -
    # w_plain| after every round (how far training carries a rounding-sized difference)
    control: list[float] = field(default_factory=list)
    control_site: str = ""
    secure_vs_control: list[float] = field(default_factory=list)  # max |w_secure - w_control|

    def arm(self, label: str) -> ArmResult:
        return next(a for a in self.arms if a.label == label)


# -- the arms ------------------------------------------------------------------------------------
def _slug(label: str) -> str:
    return "".join(ch for ch in label.lower() if ch.isalnum())


class Campaign:
    """One arm's campaign in its own round store, registry model and Dagster instance, run a
    round at a time (`step`), so that arms can be interleaved round by round: whatever else
    loads the machine then weighs on every arm alike."""

    def __init__(
        self, label: str, fleet: dict, settings: Mapping, workdir: Path, stack: ExitStack
    ) -> None:
        import dagster as dg

        from twin_pipelines.config import RoundConfig
        from twin_pipelines.definitions import build_definitions
        from twin_pipelines.resources import InProcessFleet, MlflowRegistry, RoundStore

        self.label, self.settings = label, dict(settings)
        self.store = RoundStore(root=str(workdir / _slug(label)))
        registry = MlflowRegistry(
            tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
            artifact_root=str(workdir / "artifacts"),
            model_name=f"privacy-{_slug(label)}",
        )
        self.defs = build_definitions(
            fleet=InProcessFleet(fleet), store=self.store, registry=registry
        )
        self.config = RoundConfig(**settings)
        self.instance = stack.enter_context(dg.DagsterInstance.ephemeral())
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.candidates: list[dict] = []
        self.passed = 0
        self.evaluation: dict = {}

    def step(self) -> None:
        """One round, timed (the Dagster run alone, not the reading of its results)."""
        from twin_pipelines.campaign import run_round

        started = time.perf_counter()
        result = run_round(self.defs, self.instance, self.config, log_level="ERROR")
        self.seconds.append(time.perf_counter() - started)
        if not result.success and not result.pooled:
            raise RuntimeError(f"{self.label}: {result.error}")
        self.passed += result.success
        key = result.round_key
        self.evaluation = self.store.read_json(key, "evaluation.json")
        self.losses.append(float(self.evaluation["pooled"]["loss"]))
        self.candidates.append(self.store.load(self.store.round_dir(key) / "candidate.twt").weights)

    def result(self) -> ArmResult:
        ledger = self.store.ledger()
        scopes_ = ledger.scopes
        return ArmResult(
            label=self.label,
            settings=dict(self.settings),
            pooled_loss=list(self.losses),
            round_seconds=list(self.seconds),
            rounds_passed=self.passed,
            final=dict(self.evaluation["pooled"]),
            per_site={s: dict(m) for s, m in self.evaluation["per_site"].items()},
            epsilon={scope: ledger.spent(scope, DELTA) for scope in scopes_},
            sample_rate={scope: ledger.events(scope)[-1].sample_rate for scope in scopes_},
            dp_steps={scope: sum(e.steps for e in ledger.events(scope)) for scope in scopes_},
        )


def run_arm(label: str, fleet: dict, rounds: int, settings: Mapping, workdir: Path):
    """A campaign of `rounds` rounds on its own; returns (ArmResult, the candidate of every
    round)."""
    with ExitStack() as stack:
        campaign = Campaign(label, fleet, settings, workdir, stack)
        for _ in range(rounds):
            campaign.step()
    return campaign.result(), campaign.candidates


class NudgedSite:
    """A site whose first update is off by one float32 ulp wherever training changed the
    model (towards +inf): a difference the size of secure aggregation's fixed-point rounding,
    in a plain round."""

    def __init__(self, inner) -> None:
        self.inner, self.site_id, self.nudged = inner, inner.site_id, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, round_key, fingerprint, config, weights, *args, **kwargs):
        from dataclasses import replace

        update = self.inner.train(round_key, fingerprint, config, weights, *args, **kwargs)
        if self.nudged:
            return update
        self.nudged = True
        out = {}
        for name, value in update.weights.items():
            if value.dtype == np.float32 and name in weights:
                moved = value != weights[name]
                value = np.where(moved, np.nextafter(value, np.float32(np.inf)), value)
            out[name] = value
        return replace(update, weights=out)


def frozen_tensors(candidates: list[Mapping[str, np.ndarray]]) -> list[str]:
    """The floating-point tensors equal in every candidate (what training never changes)."""
    first = candidates[0]
    return [
        k
        for k, v in first.items()
        if v.dtype.kind == "f" and all(np.array_equal(c[k], v) for c in candidates[1:])
    ]


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """The largest |a - b| over the floating-point tensors both models hold."""
    keys = [k for k in a if k in b and np.asarray(a[k]).dtype.kind == "f"]
    if set(keys) != {k for k in b if np.asarray(b[k]).dtype.kind == "f"}:
        raise ValueError("the two models hold different tensors")
    return max(
        float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
        for k in keys
    )


# -- the micro-benchmark ---------------------------------------------------------------------------
def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_secagg(
    sizes=BENCH_SIZES, sites: int = BENCH_SITES, repeats: int = BENCH_REPEATS, seed: int = 0
) -> list[BenchRow]:
    """Time the secure aggregation of `sites` float32 updates of each size (pure twin_core)."""
    from twin_core import secagg
    from twin_core.secagg import MaskingPlan, SiteSession

    ids = [f"site-{i}" for i in range(1, sites + 1)]
    rng = np.random.default_rng(seed)
    weights = {s: float(16 * 3**i) for i, s in enumerate(ids)}  # examples, unequal sites
    threshold = secagg.default_threshold(sites)
    rows = []
    for n in sizes:
        updates = {s: {"w": rng.normal(0.0, 1e-2, n).astype(np.float32)} for s in ids}

        def plain_sum(updates=updates, n=n):
            total = np.zeros(n, np.float64)
            for s in ids:
                total += weights[s] * updates[s]["w"].astype(np.float64)
            return total

        plain_s = _median_time(plain_sum, repeats)
        expected = plain_sum()
        mask_times, unmask_times, error = [], [], 0.0
        for r in range(repeats):
            key = f"bench-{n}-{r}"
            sessions = {s: SiteSession(s, key) for s in ids}
            roster = [sessions[s].advertise() for s in ids]
            sealed = {s: sessions[s].share(roster, threshold) for s in ids}
            masked, per_site = {}, []
            for s in ids:
                plan = MaskingPlan(
                    tuple(ids), tuple(x for f in ids for x in sealed[f] if x.to_site == s)
                )
                started = time.perf_counter()
                masked[s] = sessions[s].mask(plan, secagg.encode(updates[s], weights[s]))
                per_site.append(time.perf_counter() - started)
            mask_times.append(float(np.mean(per_site)))
            revealed = [x for s in ids for x in sessions[s].unmask(ids)]
            started = time.perf_counter()
            total = secagg.unmask_sum(key, roster, threshold, masked, revealed, ids)
            unmask_times.append(time.perf_counter() - started)
            decoded = secagg.decode(total, updates[ids[0]])["w"]
            error = max(error, float(np.max(np.abs(decoded - expected))))
        rows.append(
            BenchRow(
                n,
                sites,
                plain_s,
                statistics.median(mask_times),
                statistics.median(unmask_times),
                error,
            )
        )
    return rows


# -- the run -------------------------------------------------------------------------------------
def run(
    rounds: int = 8,
    seed: int = 7,
    *,
    arms: Mapping[str, Mapping] | None = None,
    sites: tuple[SiteProfile, ...] = DEFAULT_SITES,
    local_epochs: int = COMMON["local_epochs"],
    bench_sizes=BENCH_SIZES,
    bench_repeats: int = BENCH_REPEATS,
    control_run: bool = True,
    echo: Callable[[str], None] | None = None,
) -> PrivacyExperiment:
    """Every arm (the others' times are relative to plain FedAvg's) and the one-ulp control
    (unless not `control_run`), interleaved round by round, then the micro-benchmark. Every
    arm has its own sites, from the same cohort and seed."""
    from twin_pipelines.experiments import site_handlers

    arms = dict(ARMS if arms is None else arms)
    if PLAIN not in arms:
        raise ValueError(f"the arms must include {PLAIN!r}: the others are measured against it")
    arms = {PLAIN: arms.pop(PLAIN), **arms}
    say = echo or (lambda _line: None)
    load_before = _load()
    cohort = CohortConfig(seed=seed, sites=sites)
    common = {**COMMON, "local_epochs": local_epochs, "seed": seed}
    results: list[ArmResult] = []
    candidates = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # one unreported round first: imports, the MLflow store's creation and the first
        # Dagster run's set-up would otherwise land on the plain arm's clock
        run_arm("warm-up", site_handlers(cohort, oracle=True), 1, common, workdir)
        largest = max(sites, key=lambda s: s.n_patients).site_id
        with ExitStack() as stack:
            campaigns = [
                Campaign(
                    label,
                    site_handlers(cohort, oracle=True),
                    {**common, **overrides},
                    workdir,
                    stack,
                )
                for label, overrides in arms.items()
            ]
            if control_run:
                fleet = site_handlers(cohort, oracle=True)
                fleet[largest] = NudgedSite(fleet[largest])
                campaigns.append(Campaign(CONTROL, fleet, common, workdir, stack))
            # round by round, every arm in turn, starting one arm later each round
            for r in range(rounds):
                turn = r % len(campaigns)
                for campaign in campaigns[turn:] + campaigns[:turn]:
                    campaign.step()
                say(
                    f"  round {r + 1}/{rounds}: "
                    + ", ".join(f"{c.label} {c.seconds[-1]:.2f} s" for c in campaigns)
                )
        for campaign in campaigns:
            candidates[campaign.label] = campaign.candidates
        for campaign, overrides in zip(campaigns, arms.values(), strict=False):
            arm = campaign.result()
            arm.settings = dict(overrides)
            results.append(arm)
        control: list[float] = []
        secure_vs_control: list[float] = []
        if control_run:
            nudged = candidates[CONTROL]
            control = [max_abs_diff(a, b) for a, b in zip(nudged, candidates[PLAIN], strict=True)]
            if SECURE in candidates:
                secure_vs_control = [
                    max_abs_diff(a, b) for a, b in zip(candidates[SECURE], nudged, strict=True)
                ]
    plain = results[0]
    for arm in results:
        arm.seconds_ratio = arm.mean_seconds / plain.mean_seconds
        arm.diff_by_round = [
            max_abs_diff(a, b)
            for a, b in zip(candidates[arm.label], candidates[PLAIN], strict=True)
        ]
        arm.model_diff_vs_plain = arm.diff_by_round[-1]
    final_plain = candidates[PLAIN][-1]
    model_values = sum(int(v.size) for v in final_plain.values() if v.dtype.kind == "f")
    frozen = frozen_tensors(candidates[PLAIN]) if rounds > 1 else []
    for arm in results:
        if frozen:
            arm.frozen_drift = max(
                float(
                    np.max(
                        np.abs(candidates[arm.label][-1][k].astype(np.float64) - final_plain[k])
                        / np.maximum(np.abs(final_plain[k]), 1e-12)
                    )
                )
                for k in frozen
            )
    say(f"  micro-benchmark: twin_core.secagg, {BENCH_SITES} sites, sizes {list(bench_sizes)}")
    bench = bench_secagg(bench_sizes, repeats=bench_repeats)
    settings = {
        "rounds": rounds,
        "seed": seed,
        "sites": ", ".join(f"{s.site_id} ({s.n_patients} patients)" for s in sites),
        **{k: v for k, v in common.items() if k != "seed"},
        "per-arm overrides": {label: results[i].settings for i, label in enumerate(arms)},
        "delta": DELTA,
        "micro-benchmark": f"{BENCH_SITES} sites, median of {bench_repeats} repeats",
        "machine": _machine(),
        "load average (1 min) before and after": f"{load_before:.2f}, {_load():.2f}",
    }
    smallest = min(sites, key=lambda s: s.n_patients).site_id
    return PrivacyExperiment(
        results,
        bench,
        settings,
        smallest,
        [s.site_id for s in sites],
        model_values,
        frozen,
        control,
        largest if control else "",
        secure_vs_control,
    )


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return math.nan


def _machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


# -- the report ----------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _eps(value: float | None) -> str:
    if value is None:
        return "–"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def scopes(experiment: PrivacyExperiment) -> list[str]:
    found = {s for a in experiment.arms for s in a.epsilon}
    return [s for s in experiment.sites if s in found] + sorted(found - set(experiment.sites))


def accuracy_table(experiment: PrivacyExperiment) -> list[str]:
    small = experiment.smallest
    lines = [
        f"| arm | pooled loss | MAE h1 | x oracle | {small} MAE h1 | {small} x oracle "
        "| coverage 90 % | s / round (mean ± SD) | x plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in experiment.arms:
        site = a.per_site.get(small, {})
        lines.append(
            f"| {a.label} | {_fmt(a.pooled_loss[-1], 4)} | {_fmt(a.final.get('mae_h1'))} "
            f"| {_fmt(a.final.get('mae_h1_vs_oracle'))} | {_fmt(site.get('mae_h1'))} "
            f"| {_fmt(site.get('mae_h1_vs_oracle'))} | {_fmt(a.final.get('coverage90_all'))} "
            f"| {_fmt(a.mean_seconds, 2)} ± {_fmt(a.sd_seconds, 2)} "
            f"| {_fmt(a.seconds_ratio, 2)} |"
        )
    return lines


def epsilon_table(experiment: PrivacyExperiment) -> list[str]:
    cols = scopes(experiment)
    lines = ["| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for a in experiment.arms:
        cells = [_eps(a.epsilon.get(c)) for c in cols]
        lines.append(f"| {a.label} | " + " | ".join(cells) + " |")
    return lines


def divergence_lines(experiment: PrivacyExperiment) -> list[str]:
    """Secure aggregation's candidate against plain FedAvg's, round by round, beside the
    one-ulp control."""
    if SECURE not in {a.label for a in experiment.arms}:
        return []
    secure = experiment.arm(SECURE)
    rounds = range(1, len(secure.diff_by_round) + 1)
    lines = [
        "### Secure aggregation's model against plain FedAvg's, round by round",
        "",
        "| max abs difference of the candidates | " + " | ".join(f"r{r}" for r in rounds) + " |",
        "|---" * (len(rounds) + 1) + "|",
        f"| {SECURE} | " + " | ".join(f"{d:.1e}" for d in secure.diff_by_round) + " |",
    ]
    if experiment.control:
        lines.append(
            f"| control: plain FedAvg, {experiment.control_site}'s first update + 1 float32 "
            "ulp | " + " | ".join(f"{d:.1e}" for d in experiment.control) + " |"
        )
    if experiment.secure_vs_control:
        lines.append(
            f"| {SECURE} against the control (not plain) | "
            + " | ".join(f"{d:.1e}" for d in experiment.secure_vs_control)
            + " |"
        )
    lines += [
        "",
        f"Over all {experiment.model_values:,} floating-point values of the model. The secure "
        "sum is exact to the fixed point (2^-24 per value and site: tests/core/test_secagg.py), "
        f"so the first candidates agree to {secure.diff_by_round[0]:.0e}. Each later round "
        "trains from a model a rounding away from plain FedAvg's, and local training can "
        "carry such a difference far: compare the control, a plain campaign whose only change "
        "is one float32 ulp in one site's first update, and secure aggregation against the "
        "control. Plain FedAvg itself is bit-reproducible (the same seed gives the same bits: "
        "tests/pipelines/test_round_inprocess.py).",
        "",
        "The amplifier is the sites' Adam, restarted every round: it divides each gradient "
        "component by its own running scale, so a component near zero moves its weight by "
        "about the learning rate whichever its sign, and a tiny change of the model can flip "
        "that sign. (Checked by hand for seed 7, not part of this command: site-2's round-4 "
        "training from the plain and the secure round-3 models, 4.5e-08 apart, ends 7.7e-04 "
        "apart on one weight with Adam, and still 4.5e-08 apart with SGD.)",
        "",
    ]
    return lines


def dp_fedavg_lines(experiment: PrivacyExperiment) -> list[str]:
    """What DP-FedAvg's noise is against the update it protects, and where it lands."""
    n_sites = len(experiment.sites)
    out = []
    for a in experiment.arms:
        z, clip = a.settings.get("dp_noise_multiplier", 0.0), a.settings.get("dp_clip", 0.0)
        if not z:
            continue
        std = z * clip / n_sites
        line = (
            f"- {a.label}: the noise on the mean update is {std:g} per value ({z:g} x clip "
            f"{clip:g} / {n_sites} sites), about {std * math.sqrt(experiment.model_values):.1f} "
            f"in norm over the model's {experiment.model_values:,} values, against a mean of "
            f"clipped updates of norm at most {clip:g}; with {n_sites} sites all taking part "
            "(q = 1) its epsilon is large, and it protects a whole site, not a patient "
            "(docs/threat-model.md). A re-run's figures swing widely."
        )
        if experiment.frozen and math.isfinite(a.frozen_drift):
            others = [
                b.frozen_drift
                for b in experiment.arms
                if not b.settings.get("dp_noise_multiplier") and math.isfinite(b.frozen_drift)
            ]
            line += (
                " The noise goes on the learnt parameters only: the tensors no round changes "
                f"({', '.join(experiment.frozen)}: the standardisation, fixed from the pooled "
                f"moments) moved by {a.frozen_drift:.1%} of their value (the other arms: at most "
                f"{max(others, default=0.0):.1%})."
            )
        out.append(line)
    return out


def sampling_lines(experiment: PrivacyExperiment) -> list[str]:
    """How each site's DP-SGD was sampled (from the ledger), and what that does to epsilon."""
    arm = next((a for a in experiment.arms if a.settings.get("dpsgd_noise_multiplier")), None)
    if arm is None:
        return []
    sites = [s for s in experiment.sites if s in arm.sample_rate]
    rates = ", ".join(f"{s} q = {arm.sample_rate[s]:.2f}, {arm.dp_steps[s]} steps" for s in sites)
    return [
        f"DP-SGD's Poisson sampling (from the ledger of {arm.label}): {rates}. A site "
        "samples each training patient with q = batch size (64) / its training patients "
        "(at most 1) and takes 1 / q steps per epoch, so every patient is seen about once "
        "per epoch whatever the site's size. Sites with fewer training patients than the "
        "batch size take one full step per epoch (q = 1) and spend the same. Amplification "
        "by sampling pays off only at small q and enough noise, against more steps: a larger "
        "site need not spend less than a smaller one (compare the table).",
        "",
    ]


def bench_table(experiment: PrivacyExperiment) -> list[str]:
    lines = [
        "| values per update | plain weighted sum, all sites (ms) | encode + mask, one site "
        "(ms) | x plain | unmask_sum (ms) | x plain | upload per site, masked (MB) "
        "| max abs error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in experiment.bench:
        lines.append(
            f"| {b.values:,} | {1e3 * b.plain_sum_s:.2f} | {1e3 * b.mask_per_site_s:.2f} "
            f"| {b.mask_ratio:.0f} | {1e3 * b.unmask_s:.2f} | {b.unmask_ratio:.0f} "
            f"| {8 * b.values / 1e6:.2f} (float32: {4 * b.values / 1e6:.2f}) "
            f"| {b.max_error:.1e} |"
        )
    return lines


def headline(experiment: PrivacyExperiment) -> list[str]:
    """Sentences with the figures that matter, for whichever of the standard arms ran."""
    labels = {a.label for a in experiment.arms}
    plain = experiment.arm(PLAIN)
    small = experiment.smallest
    out = []
    if SECURE in labels:
        s = experiment.arm(SECURE)
        rounds = len(s.diff_by_round)
        sentence = (
            f"Secure aggregation took {s.seconds_ratio:.2f} x the plain round's time "
            f"({s.mean_seconds:.2f} s against {plain.mean_seconds:.2f} s). Its first candidate "
            f"differs from plain FedAvg's by {s.diff_by_round[0]:.1e} (fixed point at 2^-24)"
        )
        if rounds > 1:
            sentence += (
                f", its last by {s.model_diff_vs_plain:.1e} (pooled loss "
                f"{s.pooled_loss[-1]:.4f} against {plain.pooled_loss[-1]:.4f})"
            )
        if rounds > 1 and experiment.control:
            sentence += (
                f"; plain FedAvg with one float32 ulp added to one site's first update ends "
                f"{experiment.control[-1]:.1e} from plain FedAvg"
            )
            if experiment.secure_vs_control:
                sentence += (
                    f" and {experiment.secure_vs_control[-1]:.1e} from secure aggregation "
                    "(round by round below)"
                )
        out.append(sentence + ".")
    for a in experiment.arms:
        if "dpsgd_noise_multiplier" not in a.settings or a.settings.get("secure_aggregation"):
            continue
        worst = max(a.epsilon, key=a.epsilon.get) if a.epsilon else None
        best = min(a.epsilon, key=a.epsilon.get) if a.epsilon else None
        out.append(
            f"{a.label}: epsilon {_eps(a.epsilon.get(worst))} at {worst} down to "
            f"{_eps(a.epsilon.get(best))} at {best} (delta {DELTA:g}); one-visit-ahead MAE "
            f"{_fmt(a.final.get('mae_h1'))} = {_fmt(a.final.get('mae_h1_vs_oracle'))} x the "
            f"oracle (plain {_fmt(plain.final.get('mae_h1'))} = "
            f"{_fmt(plain.final.get('mae_h1_vs_oracle'))} x), at {small} "
            f"{_fmt(a.per_site.get(small, {}).get('mae_h1_vs_oracle'))} x (plain "
            f"{_fmt(plain.per_site.get(small, {}).get('mae_h1_vs_oracle'))} x); "
            f"{a.seconds_ratio:.2f} x the plain round time."
        )
    for a in experiment.arms:
        if a.settings.get("dp_noise_multiplier"):
            out.append(
                f"{a.label}: epsilon {_eps(a.epsilon.get('federation'))} for the federation "
                f"(each site's whole participation), MAE {_fmt(a.final.get('mae_h1'))} = "
                f"{_fmt(a.final.get('mae_h1_vs_oracle'))} x the oracle."
            )
    return out


def report_lines(experiment: PrivacyExperiment, command: str) -> list[str]:
    s = experiment.settings
    n_sites = len(experiment.sites)
    lines = [
        "# The cost of privacy: secure aggregation, DP-SGD and DP-FedAvg",
        "",
        "![pooled loss per round, the model against plain FedAvg's, epsilon per scope, "
        "secure aggregation micro-benchmark](privacy.png)",
        "",
        f"One campaign of {s['rounds']} rounds ({s['local_epochs']} local epochs each) per arm "
        f"on the default synthetic cohort ({n_sites} sites, seed {s['seed']}), every round a "
        "Dagster run of the real round assets with the sites in-process (the site worker's "
        "code, no gRPC). Figures are the last round's candidate evaluated on every site's "
        "holdout patients; times are the wall time of each round's run, against the plain "
        "arm's measured in the same run: the arms run interleaved, round by round (each "
        "round starting one arm later), so that whatever else loads the machine weighs on "
        "all of them alike.",
        "",
        *(f"- {line}" for line in headline(experiment)),
        "",
        "## Accuracy and round time",
        "",
        *accuracy_table(experiment),
        "",
        "MAE h1: one-visit-ahead mean absolute error, pooled over sites or at "
        f"{experiment.smallest} (the smallest site); x oracle: as a multiple of the "
        "generator's Bayes forecast on the same points; coverage 90 %: share of observed "
        "values inside the twin's 90 % intervals, every horizon, pooled.",
        "",
        *divergence_lines(experiment),
        f"## Privacy spent (epsilon at delta {DELTA:g}, per scope, from each arm's ledger)",
        "",
        *epsilon_table(experiment),
        "",
        "A site's scope is its patients under DP-SGD (patient-level); `federation` is "
        "site-level DP-FedAvg (a site's whole participation). – : no differential privacy, "
        "no epsilon is claimed.",
        "",
        *sampling_lines(experiment),
        f"## Secure aggregation alone: twin_core.secagg, {BENCH_SITES} sites, no Dagster",
        "",
        *bench_table(experiment),
        "",
        "Median of repeats; each repeat is a fresh protocol run (keys, Shamir shares, masks). "
        "Encode + mask: one site's fixed-point encoding of its weighted update and its self "
        f"mask plus {BENCH_SITES - 1} pair masks (ChaCha20 keystreams); unmask_sum: the "
        "orchestrator rebuilds every self-mask seed from the revealed shares and strips it. "
        "x plain: against the plain weighted float64 sum of all the sites' updates, the "
        "orchestrator's whole work without secure aggregation. A masked update travels as "
        "uint64, twice the float32 update's size. Max abs error: the decoded sum against the "
        "plain one.",
        "",
        "## Notes",
        "",
        "- DP arms are not bit-reproducible: under DP-SGD every site draws its noise from a "
        "fresh secret per training call (so the orchestrator, which picks the seed, cannot "
        "subtract it), and DP-FedAvg's noise comes from the operating system's random source. "
        "A re-run gives other figures (DP-SGD's close to these, DP-FedAvg's far apart). "
        "Plain FedAvg and secure aggregation repeat exactly, times aside: the masks cancel "
        "exactly and the fixed-point rounding is deterministic.",
        "- The times include everything a round does in-process (Dagster run, round store, "
        "MLflow registration, evaluation): they are this machine's, not a network's, and "
        "depend on its load (settings): the round-to-round SD is of the size of the "
        "differences between arms, so read the ratios to a tenth at best. Secure "
        "aggregation's compute alone is in the micro-benchmark. Over gRPC secure aggregation "
        "adds three round trips per site (advertise, share, unmask) and doubles the update's "
        "upload.",
        *dp_fedavg_lines(experiment),
        "- Gates are relaxed (regression tolerances and the update-norm bound off) so that each "
        "arm's own trajectory shows; one unreported warm-up round runs first.",
        "",
        "## Settings",
        "",
        *(f"- {k}: {v}" for k, v in s.items()),
        "- rounds that passed every gate: "
        + ", ".join(f"{a.label} {a.rounds_passed}/{len(a.pooled_loss)}" for a in experiment.arms),
        f"- command: `{command}`",
    ]
    return lines


def stdout_table(experiment: PrivacyExperiment) -> list[str]:
    """The figures in a few lines of fixed-width text."""
    small = experiment.smallest
    cols = scopes(experiment)
    row = "{:<36}{:>9}{:>8}{:>8}{:>10}{:>8}{:>8}{:>8}  {}"
    lines = [
        row.format(
            "arm",
            "loss",
            "MAE h1",
            "x orac",
            f"{small} x",
            "cov90",
            "s/rnd",
            "x plain",
            "epsilon (delta 1e-5)",
        )
    ]
    for a in experiment.arms:
        eps = ", ".join(f"{c} {_eps(a.epsilon[c])}" for c in cols if c in a.epsilon) or "-"
        lines.append(
            row.format(
                a.label,
                _fmt(a.pooled_loss[-1], 4),
                _fmt(a.final.get("mae_h1")),
                _fmt(a.final.get("mae_h1_vs_oracle")),
                _fmt(a.per_site.get(small, {}).get("mae_h1_vs_oracle")),
                _fmt(a.final.get("coverage90_all")),
                _fmt(a.mean_seconds, 2),
                _fmt(a.seconds_ratio, 2),
                eps,
            )
        )
    if SECURE in {a.label for a in experiment.arms}:
        lines.append(
            f"{'secure aggregation vs plain, max abs difference of the candidates by round:':<76}"
            + " ".join(f"{d:.1e}" for d in experiment.arm(SECURE).diff_by_round)
        )
        for label, diffs in (
            (
                f"control (plain, {experiment.control_site}'s first update + 1 ulp) vs plain",
                experiment.control,
            ),
            ("secure aggregation vs the control", experiment.secure_vs_control),
        ):
            if diffs:
                lines.append(f"  {label + ':':<74}" + " ".join(f"{d:.1e}" for d in diffs))
    lines.append("secagg micro-benchmark (ms): values, plain sum, mask/site (x), unmask (x)")
    for b in experiment.bench:
        lines.append(
            f"  {b.values:>9,}  {1e3 * b.plain_sum_s:8.2f}  {1e3 * b.mask_per_site_s:8.2f} "
            f"({b.mask_ratio:.0f} x)  {1e3 * b.unmask_s:8.2f} ({b.unmask_ratio:.0f} x)"
        )
    return lines


def plot(experiment: PrivacyExperiment, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, all_axes = plt.subplots(1, 4, figsize=(19, 4))
    for a in experiment.arms:
        rounds = range(1, len(a.pooled_loss) + 1)
        all_axes[0].plot(rounds, a.pooled_loss, marker="o", ms=3, label=a.label)
    all_axes[0].set(xlabel="round", ylabel="pooled validation loss (NLL)", title="loss per round")
    all_axes[0].legend(fontsize=7)
    divergence = all_axes[1]
    if SECURE in {a.label for a in experiment.arms}:
        diffs = experiment.arm(SECURE).diff_by_round
        rounds = range(1, len(diffs) + 1)
        divergence.semilogy(rounds, np.maximum(diffs, 1e-12), marker="o", label=SECURE)
        if experiment.control:
            divergence.semilogy(
                rounds,
                np.maximum(experiment.control, 1e-12),
                marker="x",
                ls="--",
                label=f"control: {experiment.control_site} + 1 ulp once",
            )
        divergence.legend(fontsize=7)
    divergence.set(xlabel="round", ylabel="max |w - w plain FedAvg|", title="model vs plain FedAvg")
    axes = all_axes[1:]  # axes[1]: epsilon, axes[2]: the micro-benchmark
    cols = scopes(experiment)
    dp = [a for a in experiment.arms if a.epsilon]
    width = 0.8 / max(len(dp), 1)
    for i, a in enumerate(dp):
        values = [a.epsilon.get(c, 0.0) for c in cols]
        axes[1].bar(
            np.arange(len(cols)) + (i - (len(dp) - 1) / 2) * width, values, width, label=a.label
        )
    axes[1].set_xticks(range(len(cols)), cols, fontsize=7)
    axes[1].set(ylabel=f"epsilon at delta {DELTA:g}", title="privacy spent per scope")
    if dp:
        finite = [e for a in dp for e in a.epsilon.values() if math.isfinite(e)]
        axes[1].set_ylim(0, 1.5 * max(finite, default=1.0))  # room for the legend above
        axes[1].legend(fontsize=7, loc="upper center", ncol=2)
    sizes = [b.values for b in experiment.bench]
    for attr, label in (
        ("plain_sum_s", "plain weighted sum (all sites)"),
        ("mask_per_site_s", "encode + mask (one site)"),
        ("unmask_s", "unmask_sum (orchestrator)"),
    ):
        axes[2].loglog(
            sizes, [1e3 * getattr(b, attr) for b in experiment.bench], marker="o", label=label
        )
    axes[2].set(
        xlabel="values per update",
        ylabel="ms (median)",
        title=f"secure aggregation, {BENCH_SITES} sites",
    )
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_report(experiment: PrivacyExperiment, out: Path, command: str) -> Path:
    """Write `privacy.md` and `privacy.png` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot(experiment, out / "privacy.png")
    path = out / "privacy.md"
    path.write_text("\n".join(report_lines(experiment, command)) + "\n")
    return path


def write_report(
    rounds: int, seed: int, out: Path, *, echo: Callable[[str], None] | None = None
) -> Path:
    """Run the experiment and write its report; `echo` gets progress and the figures."""
    experiment = run(rounds, seed, echo=echo)
    path = save_report(experiment, out, f"twin experiment privacy --rounds {rounds} --seed {seed}")
    if echo:
        echo("")
        for line in stdout_table(experiment):
            echo(line)
    return path
