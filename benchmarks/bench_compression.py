"""Benchmark 7: update compression, its bytes on the wire and its effect on the pooled loss.

For each method (float16, int8, top-k at 10 % of each tensor's entries) and for "none" in the
same run: a campaign of `ROUNDS` FedAvg rounds over the default 5-site synthetic cohort, in
this process, through the functions a round runs, without Dagster, MLflow and the sites' Great
Expectations check around them (they cost seconds and do not depend on the method):

- each site, as `SiteHandler.train`: its cohort split (`task.prepare`, the handler's holdout
  share and split seed), `train_local` from the global model with the round config's
  TrainConfig, then `compression.encode_update` with the residual it kept (error feedback);
- the orchestrator, as `site_updates` and `global_model`: `compression.receive_update` and
  `check_update` per site, then `aggregate` (FedAvg by examples);
- after the last round, as `round_evaluation`: every site's holdout statistics, pooled
  (`pool_evaluations`).

Two rows per method, each a ratio against "none" from the same run: the update bytes on the
wire per round (the tensors' bytes of every site's answer; the codec's header adds a few
hundred bytes per update whatever the method), and the pooled loss after the campaign. The
targets: the bytes each method's encoding implies (float16 1/2, int8 1/4 plus a scale per
tensor, top-k one int32 index and one float32 value per entry kept: 2 x 10 %, plus at least one
entry of every small tensor), and a pooled loss no worse than the round's default regression
tolerance (2 %) above uncompressed training.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.harness import Result, Target, mb

ORDER = 7
TITLE = "update compression"
ROUNDS = 5
QUICK_ROUNDS = 2
TOPK_FRACTION = 0.1
METHODS = ("float16", "int8", "topk")
BYTES_TARGET = {
    "float16": Target("ratio", "<=", 0.51),
    "int8": Target("ratio", "<=", 0.26),
    "topk": Target("ratio", "<=", 0.25),
}
LOSS_TARGET = Target("ratio", "<=", 1.02)


@dataclass(frozen=True)
class Campaign:
    method: str
    wire_bytes: list[int]  # per round, all sites
    model_bytes: list[int]  # the same updates uncompressed
    pooled_loss: float  # after the last round


@dataclass
class _Site:
    site_id: str
    task: object
    data: object
    model: object


def _sites(cohort_config) -> dict[str, _Site]:
    """The cohort's sites, split as a SiteHandler splits them (holdout 20 %, split seed 0)."""
    from site_worker.handler import SiteHandler
    from twin_core.cohort import cohort_schema, generate_cohort
    from twin_core.schema import check_frame, parse_schema
    from twin_core.tasks import task_for

    cohort = generate_cohort(cohort_config)
    schema = parse_schema(cohort_schema(cohort_config.params))
    defaults = SiteHandler.__init__.__kwdefaults__
    out = {}
    for profile in cohort_config.sites:
        task = task_for(schema)
        frame = check_frame(schema, cohort.site(profile.site_id))
        data = task.prepare(frame, defaults["holdout_fraction"], defaults["split_seed"])
        out[profile.site_id] = _Site(profile.site_id, task, data, task.build_model({}, seed=0))
    return out


def _campaign(sites: dict[str, _Site], method: str, rounds: int, settings: dict) -> Campaign:
    from twin_core.compression import encode_update, payload_bytes, receive_update
    from twin_core.federation import SiteEvaluation, pool_moments
    from twin_core.rounds import pool_evaluations, site_seed
    from twin_core.strategies import SiteContribution, Strategy, aggregate, planned_steps
    from twin_core.training import evaluate, load_weights_into, train_local, weights_of
    from twin_core.weights import check_update
    from twin_pipelines.config import RoundConfig

    config = RoundConfig(compression=method, topk_fraction=TOPK_FRACTION, **settings)
    order = sorted(sites)
    first = sites[order[0]]
    moments = pool_moments(sites[s].data.moments for s in order)
    model = weights_of(first.task.build_model(moments, config.seed))
    residual: dict[str, dict] = {s: {} for s in order}  # every site starts with none
    wire, raw = [], []
    for index in range(1, rounds + 1):
        key = f"r{index:04d}"
        contributions, sent, stored = [], 0, 0
        for s in order:
            site = sites[s]
            train_config = config.train_config(site_seed(config.seed, key, s))
            load_weights_into(site.model, model)
            steps, _ = train_local(site.task, site.model, site.data.train, train_config)
            answer = weights_of(site.model)
            if method != "none":
                answer, residual[s] = encode_update(
                    answer, model, method, residual[s], config.topk_fraction
                )
            trained = receive_update(answer, model, method)
            check_update(trained, model, config.max_update_norm)
            sent += payload_bytes(answer)
            stored += payload_bytes(trained)
            examples = site.data.train_examples
            planned = planned_steps(
                config.local_epochs, config.batch_size, examples, config.local_steps
            )
            contributions.append((SiteContribution(s, examples, steps, planned), trained))
        model, _, _ = aggregate(
            Strategy("fedavg"), model, iter(contributions), None, total_sites=len(order)
        )
        wire.append(sent)
        raw.append(stored)
    evaluations = {}
    for s in order:
        site = sites[s]
        load_weights_into(site.model, model)
        statistics = evaluate(site.task, site.model, site.data.holdout)
        evaluations[s] = SiteEvaluation(s, key, site.data.holdout_examples, statistics, 0.0)
    loss = pool_evaluations(first.task, evaluations).pooled["loss"]
    return Campaign(method, wire, raw, loss)


def run(quick: bool) -> list[Result]:
    from dataclasses import replace

    import torch

    from twin_core.cohort import CohortConfig

    rounds = QUICK_ROUNDS if quick else ROUNDS
    cohort = CohortConfig(seed=7)  # the default 5-site cohort
    settings: dict = {}  # the round config's defaults: 2 local epochs
    if quick:  # a smoke run: the same sites at most 40 patients each, a few local steps
        sites_40 = tuple(replace(p, n_patients=min(p.n_patients, 40)) for p in cohort.sites)
        cohort, settings = replace(cohort, sites=sites_40), {"local_steps": 5}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a site worker trains: one thread, the same for every method
    try:
        sites = _sites(cohort)
        runs = {m: _campaign(sites, m, rounds, settings) for m in ("none", *METHODS)}
    finally:
        torch.set_num_threads(threads)
    none = runs["none"]
    base_bytes = sum(none.wire_bytes) / rounds
    results = []
    for method in METHODS:
        c = runs[method]
        per_round = sum(c.wire_bytes) / rounds
        label = method if method != "topk" else f"top-k {TOPK_FRACTION:.0%}"
        results.append(
            Result(
                f"compression {label}: update bytes on the wire per round",
                per_round / 1e3,
                "kB",
                BYTES_TARGET[method],
                baseline=base_bytes / 1e3,
                baseline_label="uncompressed updates, same run",
                notes=(
                    f"{label}: {len(sites)} sites x {rounds} rounds; per round {mb(per_round)} "
                    f"on the wire vs {mb(base_bytes)} uncompressed "
                    f"(x{sum(c.model_bytes) / sum(c.wire_bytes):.2f} smaller)",
                ),
            )
        )
        results.append(
            Result(
                f"compression {label}: pooled loss after {rounds} rounds",
                c.pooled_loss,
                "NLL",
                LOSS_TARGET,
                baseline=none.pooled_loss,
                baseline_label="uncompressed, same run",
                notes=(
                    f"{label}: pooled loss {c.pooled_loss:.4f} after {rounds} rounds, "
                    f"uncompressed {none.pooled_loss:.4f} "
                    f"({(c.pooled_loss / none.pooled_loss - 1):+.2%})",
                ),
            )
        )
    return results
