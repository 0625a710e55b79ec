"""round_plan -> site_updates -> global_model: who trains, their updates, the candidate."""

from dataclasses import asdict

import dagster as dg
import numpy as np

from twin_core import scaffold
from twin_core.dispatch import run_on_sites
from twin_core.errors import InvalidWeights
from twin_core.federation import Site, SiteFailure, SiteInfo, pool_moments
from twin_core.gates import finite_gate, quorum_gate
from twin_core.rounds import (
    Candidate,
    RoundPlan,
    RoundUpdates,
    UpdateRecord,
    site_seed,
    site_status_of,
)
from twin_core.schema import parse_schema
from twin_core.selection import select_sites
from twin_core.strategies import SiteContribution, aggregate, planned_steps, server_control_of
from twin_core.weights import Weights, check_update
from twin_pipelines.config import RoundConfig
from twin_pipelines.metadata import check_result, failure_lines, plan_metadata, updates_metadata
from twin_pipelines.partitions import fl_round
from twin_pipelines.resources import Fleet, RoundStore

GROUP = "fl_round"


@dg.asset(partitions_def=fl_round, group_name=GROUP, kinds={"python"})
def round_plan(
    context: dg.AssetExecutionContext,
    config: RoundConfig,
    fleet: dg.ResourceParam[Fleet],
    store: RoundStore,
) -> dg.Output[RoundPlan]:
    """Ask every site for its info, choose the healthy ones, fix the model the round starts from."""
    key = context.partition_key
    if problems := config.problems():
        raise dg.Failure(f"invalid round config: {'; '.join(problems)}")
    answers = run_on_sites(
        fleet.sites(),
        lambda s: s.info(config.info_timeout_s),
        stage="info",
        timeout=config.info_timeout_s + 2,
    )
    latest = store.latest_passed()
    selection = select_sites(
        answers,
        expected_fingerprint=latest["schema_fingerprint"] if latest else None,
        max_sites=config.max_sites or None,
        policy=config.selection,
        fraction=config.fraction,
        min_sites=config.min_sites,
        seed=config.seed,
        round_key=key,
        participation=store.participation(before=key, last=5),
    )
    if len(selection.chosen) < config.min_sites:
        raise dg.Failure(
            f"round {key} needs {config.min_sites} healthy site(s), found {len(selection.chosen)}: "
            + "; ".join(f"{d.site_id}: {d.reason}" for d in selection.decisions if not d.chosen),
        )
    infos = {s: a for s, a in answers.items() if isinstance(a, SiteInfo)}
    schema = infos[selection.chosen[0]].schema
    moments = pool_moments(infos[s].moments for s in selection.chosen)
    if latest:
        start_path, start_round, start_sha = latest["path"], latest["round"], latest["sha256"]
    else:
        from twin_core.tasks import task_for
        from twin_core.training import weights_of

        model = task_for(parse_schema(schema)).build_model(moments, config.seed)
        path, manifest = store.save_weights(
            key, "start.twt", weights_of(model), {"seed": config.seed}
        )
        start_path, start_round, start_sha = str(path), None, manifest.sha256
    quality = {s: infos[s].data_check_score for s in selection.chosen}
    site_status = {s: site_status_of(i) for s, i in sorted(infos.items())}
    plan = RoundPlan(
        key,
        selection,
        schema,
        moments,
        start_path,
        start_round,
        start_sha,
        config.model_dump(),
        quality,
        site_status,
    )
    store.write_json(key, "plan.json", asdict(plan))
    return dg.Output(plan, metadata=plan_metadata(plan, config.seed))


def _train_and_persist(
    site: Site,
    plan: RoundPlan,
    config: RoundConfig,
    start: Weights,
    outgoing: Weights,
    store: RoundStore,
) -> UpdateRecord:
    """One site's part of a round: train remotely, validate, persist. Raises on any problem.

    `outgoing` is what the site receives: the start model, plus SCAFFOLD's control variate.
    """
    key = plan.round_key
    train_config = config.train_config(site_seed(config.seed, key, site.site_id))
    update = site.train(
        key, plan.selection.schema_fingerprint, train_config, outgoing, config.train_timeout_s
    )
    try:
        if update.num_examples <= 0:
            raise InvalidWeights(f"update claims {update.num_examples} training examples")
        model, control_delta = scaffold.split(update.weights, scaffold.DELTA)
        norm = check_update(model, start, config.max_update_norm)
        if config.strategy == "scaffold":
            check_update(control_delta, scaffold.zeros_like(start), float("inf"))
    except InvalidWeights as exc:
        store.save_rejected(key, site.site_id, update.weights, str(exc))
        raise
    meta = {"num_examples": update.num_examples, "steps": update.steps, "metrics": update.metrics}
    path = store.save_update(key, site.site_id, update.weights, meta)
    return UpdateRecord(
        site.site_id,
        str(path),
        update.num_examples,
        update.steps,
        update.metrics,
        update.train_seconds,
        norm,
    )


def _screen(
    updates: RoundUpdates, start: Weights, key: str, config: RoundConfig, store: RoundStore
) -> RoundUpdates:
    """Reject updates whose norm or direction is an outlier among this round's (a failure with
    its reason; the update is kept under rejected/)."""
    from twin_core.robust import screen_updates

    deltas = []
    for record in updates.updates:
        weights = store.load(record.path).weights
        deltas.append(
            {
                n: weights[n].astype(np.float64) - start[n]
                for n in start
                if start[n].dtype.kind == "f"
            }
        )
    verdicts = screen_updates(
        deltas, norm_z=config.screen_norm_z, min_cosine=config.screen_min_cosine
    )
    kept, screened = [], []
    for record, reason in zip(updates.updates, verdicts, strict=True):
        if reason is None:
            kept.append(record)
        else:
            store.reject_update(key, record.site_id, reason)
            screened.append(SiteFailure(record.site_id, "screen", "SCREENED", reason))
    return RoundUpdates(tuple(kept), updates.failures + tuple(screened))


@dg.asset(
    partitions_def=fl_round,
    group_name=GROUP,
    kinds={"python"},
    check_specs=[
        dg.AssetCheckSpec(
            "quorum_met",
            asset="site_updates",
            blocking=True,
            description="at least min_sites valid updates",
        )
    ],
)
def site_updates(
    context: dg.AssetExecutionContext,
    round_plan: RoundPlan,
    fleet: dg.ResourceParam[Fleet],
    store: RoundStore,
):
    """Send the start model to every chosen site, collect, validate and persist their updates."""
    config = RoundConfig(**round_plan.config)
    start = store.load(round_plan.start_path)
    outgoing = dict(start.weights)
    if config.strategy == "scaffold":  # the server's control variate travels with the model
        state = store.server_state(round_plan.start_round, "scaffold")
        outgoing = scaffold.join(
            outgoing, server_control_of(state, start.weights), scaffold.CONTROL
        )
    store.clear_updates(round_plan.round_key)
    sites = fleet.sites()
    missing = [
        SiteFailure(s, "train", "NOT_IN_FLEET", "no longer listed in the fleet")
        for s in round_plan.selection.chosen
        if s not in sites
    ]
    results = run_on_sites(
        {s: sites[s] for s in round_plan.selection.chosen if s in sites},
        lambda site: _train_and_persist(site, round_plan, config, start.weights, outgoing, store),
        stage="train",
        timeout=config.train_timeout_s + 10,
    )
    updates = RoundUpdates.collect(results, missing)
    if config.screen_updates:
        updates = _screen(updates, start.weights, round_plan.round_key, config, store)
    for failure in updates.failures:
        context.log.warning(f"site {failure.site_id} failed: {failure.code}: {failure.reason}")
    gate = quorum_gate(len(updates.updates), config.min_sites)
    yield dg.Output(updates, metadata=updates_metadata(updates))
    description = gate.detail + (
        f"; failures: {failure_lines(updates.failures)}" if updates.failures else ""
    )
    yield check_result(gate, description)


@dg.asset(
    partitions_def=fl_round,
    group_name=GROUP,
    kinds={"pytorch"},
    check_specs=[
        dg.AssetCheckSpec(
            "weights_finite",
            asset="global_model",
            blocking=True,
            description="no NaN or infinity in the candidate",
        )
    ],
)
def global_model(
    context: dg.AssetExecutionContext,
    round_plan: RoundPlan,
    site_updates: RoundUpdates,
    store: RoundStore,
):
    """The round's strategy over the persisted updates, in sorted site order (FedAvg by
    default: weighted by examples, streamed into float64)."""
    config = RoundConfig(**round_plan.config)
    strategy = config.aggregation_strategy()
    start = store.load(round_plan.start_path).weights
    contributions = [
        (
            SiteContribution(
                u.site_id,
                u.num_examples,
                u.steps,
                planned_steps(config.local_epochs, config.batch_size, u.num_examples),
                round_plan.quality.get(u.site_id, 1.0),
            ),
            u.path,
        )
        for u in sorted(site_updates.updates, key=lambda u: u.site_id)
    ]
    weights, server_state, facts = aggregate(
        strategy,
        start,
        ((site, store.load(path).weights) for site, path in contributions),
        store.server_state(round_plan.start_round, strategy.name)
        if strategy.server or strategy.name == "scaffold"
        else None,
        total_sites=len(round_plan.selection.compatible),
    )
    if server_state is not None:
        store.save_server_state(round_plan.round_key, strategy.name, server_state)
    site_examples = {u.site_id: u.num_examples for u in site_updates.updates}
    path, manifest = store.save_weights(
        round_plan.round_key,
        "candidate.twt",
        weights,
        {"strategy": config.strategy, "site_examples": site_examples},
    )
    candidate = Candidate(
        round_plan.round_key,
        str(path),
        manifest.sha256,
        sum(int(w.size) for w in weights.values()),
        tuple(sorted(site_examples)),
        site_examples,
    )
    gate = finite_gate(weights)
    yield dg.Output(
        candidate,
        metadata={
            "strategy": config.strategy,
            **{k: dg.MetadataValue.json(v) if isinstance(v, list) else v for k, v in facts.items()},
            "sites": len(site_examples),
            "parameters": candidate.parameters,
            "sha256": manifest.sha256,
            "path": dg.MetadataValue.path(str(path)),
        },
    )
    yield check_result(gate)
