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
    config = config.for_fleet(production=bool(getattr(fleet, "tls_dir", "")))
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
    privacy = _check_privacy_budget(config, key, selection, infos, store)
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
        privacy_settings(
            config,
            getattr(fleet, "mode", "in-process (no network)"),
            privacy,
            campaign_of(config, context.run.tags),
        ),
    )
    store.write_json(key, "plan.json", asdict(plan))
    metadata = plan_metadata(plan, config.seed)
    metadata["privacy"] = dg.MetadataValue.json(plan.privacy)
    return dg.Output(plan, metadata=metadata)


def campaign_of(config: RoundConfig, tags: dict) -> str:
    """The campaign a round's privacy spending is booked to: the config's, else the campaign
    the run belongs to (its twin/campaign tag), else "default"."""
    from twin_pipelines.sensors import CAMPAIGN_TAG

    if config.campaign != "default":
        return config.campaign
    return tags.get(CAMPAIGN_TAG, "default")


def privacy_settings(
    config: RoundConfig, transport: str, epsilon_after: dict, campaign: str
) -> dict:
    """What protects this round's data, for the record (plan, registry tags, model card)."""
    out: dict = {
        "transport": transport,
        "secure_aggregation": config.secure_aggregation,
        "delta": config.privacy_delta,
        "budget": config.privacy_budget or None,
        "campaign": campaign,
    }
    if config.dp_clip > 0:
        out["dp_fedavg"] = {"clip": config.dp_clip, "noise_multiplier": config.dp_noise_multiplier}
    if config.dpsgd_noise_multiplier > 0:
        out["dp_sgd"] = {
            "clip": config.dpsgd_clip,
            "noise_multiplier": config.dpsgd_noise_multiplier,
        }
    if epsilon_after:
        out["epsilon_after_round"] = epsilon_after
    return out


def _check_privacy_budget(config, key, selection, infos, store) -> dict[str, float]:
    """Refuse the round before anything trains if it would take a privacy scope over the
    budget; return epsilon after it, by scope (empty without differential privacy)."""
    from twin_core.privacy import PrivacyBudgetExceeded, check_budget

    planned = planned_privacy(config, selection.chosen, len(selection.compatible), infos)
    if not planned:
        return {}
    try:
        after = check_budget(
            store.ledger(),
            planned,
            config.privacy_budget,
            config.privacy_delta,
            round_key=key,
        )
    except PrivacyBudgetExceeded as exc:
        raise dg.Failure(
            f"round {key} refused: it would exceed the privacy budget: {exc}"
        ) from None
    return {scope: round(eps, 4) for scope, eps in sorted(after.items())}


def planned_privacy(config, chosen, compatible: int, infos) -> dict:
    """The DP events this round will add, by privacy scope."""
    from twin_core.privacy import FEDERATION, planned_dpsgd_event, planned_fedavg_event

    planned: dict = {}
    if config.dp_noise_multiplier > 0:
        planned[FEDERATION] = [
            planned_fedavg_event(config.dp_noise_multiplier, len(chosen), max(compatible, 1))
        ]
    if config.dpsgd_noise_multiplier > 0:
        for site in chosen:
            planned[site] = [
                planned_dpsgd_event(
                    config.dpsgd_noise_multiplier,
                    config.batch_size,
                    max(infos[site].train_units or infos[site].units, 1),
                    config.local_epochs,
                    config.local_steps,
                )
            ]
    return planned


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
    from twin_core.compression import payload_bytes, receive_update

    wire_bytes = payload_bytes(update.weights)
    try:
        if update.num_examples <= 0:
            raise InvalidWeights(f"update claims {update.num_examples} training examples")
        # a compressed update is decoded against the start model first: what is checked,
        # stored and aggregated below is the trained weights, as without compression
        weights = receive_update(update.weights, start, config.compression)
        model, control_delta = scaffold.split(weights, scaffold.DELTA)
        norm = check_update(model, start, config.max_update_norm)
        if config.dp_clip > 0 and norm > config.dp_clip * (1 + 1e-4):
            raise InvalidWeights(
                f"update norm {norm:.4g} exceeds the DP clip {config.dp_clip:g}: the site did "
                "not clip, and its update would break the privacy guarantee"
            )
        if config.strategy == "scaffold":
            check_update(control_delta, scaffold.zeros_like(start), float("inf"))
    except InvalidWeights as exc:
        store.save_rejected(key, site.site_id, update.weights, str(exc))
        raise
    meta = {"num_examples": update.num_examples, "steps": update.steps, "metrics": update.metrics}
    model_bytes = payload_bytes(weights)
    meta["wire"] = {"compression": config.compression, "bytes": wire_bytes, "model": model_bytes}
    path = store.save_update(key, site.site_id, weights, meta)
    return UpdateRecord(
        site.site_id,
        str(path),
        update.num_examples,
        update.steps,
        update.metrics,
        update.train_seconds,
        norm,
        wire_bytes=wire_bytes,
        model_bytes=model_bytes,
    )


def _secure_updates(
    plan: RoundPlan,
    config: RoundConfig,
    start: Weights,
    chosen: dict[str, Site],
    missing: list[SiteFailure],
    store: RoundStore,
) -> RoundUpdates:
    """Train under secure aggregation: persist each site's masked vector (noise on its own)
    and the unmasked sum; a protocol failure fails the round with its reason."""
    from twin_core.secagg import SecAggError
    from twin_core.secure_round import run_secure_round

    key = plan.round_key
    try:
        result = run_secure_round(
            chosen,
            key,
            plan.selection.schema_fingerprint,
            start,
            lambda s: config.train_config(site_seed(config.seed, key, s)),
            threshold=config.secagg_threshold,
            weighting="uniform" if config.strategy == "fedavg_uniform" else "examples",
            step_timeout=config.info_timeout_s,
            train_timeout=config.train_timeout_s,
        )
    except SecAggError as exc:
        raise dg.Failure(f"round {key}: secure aggregation failed: {exc}") from None
    records = []
    for site_id, update in sorted(result.updates.items()):
        meta = {"num_examples": update.num_examples, "steps": update.steps, "masked": True}
        path = store.save_update(key, site_id, update.weights, meta)
        records.append(
            UpdateRecord(
                site_id,
                str(path),
                update.num_examples,
                update.steps,
                update.metrics,
                update.train_seconds,
                float("nan"),  # an individual update's norm is exactly what is hidden
            )
        )
    path, _ = store.save_weights(
        key,
        "secure_sum.twt",
        result.total,
        {"weight": result.weight, "sites": sorted(result.updates), "threshold": result.threshold},
    )
    return RoundUpdates(tuple(records), tuple(missing) + result.failures, str(path), result.weight)


def _book_dpsgd(updates: RoundUpdates, key: str, campaign: str, store: RoundStore) -> None:
    """Record the DP-SGD each site reports having run (its patients' privacy is spent once
    the update has left, whatever becomes of the round)."""
    from twin_core.privacy import dpsgd_event_from_metrics

    events = {u.site_id: dpsgd_event_from_metrics(u.metrics) for u in updates.updates}
    if not any(events.values()):
        return
    ledger = store.ledger()
    for site_id, event in events.items():
        if event is not None:
            ledger.record(key, campaign, site_id, event)
    store.save_ledger(ledger)


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
    # the start model as loaded (checked, read-only): its known SHA-256 travels in each site's
    # header instead of being computed again per site (twin_core.weights.known_manifest)
    outgoing = start.weights
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
    chosen = {s: sites[s] for s in round_plan.selection.chosen if s in sites}
    if config.secure_aggregation:
        updates = _secure_updates(round_plan, config, start.weights, chosen, missing, store)
    else:
        results = run_on_sites(
            chosen,
            lambda site: _holding_slot(
                site,
                lambda: _train_and_persist(
                    site, round_plan, config, start.weights, outgoing, store
                ),
            ),
            stage="train",
            timeout=config.train_timeout_s + 10,
        )
        updates = RoundUpdates.collect(results, missing)
    _book_dpsgd(updates, round_plan.round_key, round_plan.privacy.get("campaign", "default"), store)
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


def _holding_slot(site: Site, call):
    """Run `call` holding, once the site's update starts to arrive, one of the fleet's receive
    slots until the update is persisted (twin_core.dispatch.ReceiveSlots)."""
    slots = getattr(site, "receive_slots", None)
    if slots is None:
        return call()
    with slots.holding():
        return call()


def _parameter_names(plan: RoundPlan) -> set[str]:
    """The names of the model's learnt parameters (not its buffers)."""
    from twin_core.tasks import task_for

    model = task_for(parse_schema(plan.schema)).build_model(plan.moments, 0)
    return {name for name, _ in model.named_parameters()}


def _mean_of_sum(
    plan: RoundPlan, updates: RoundUpdates, config: RoundConfig, start: Weights, store: RoundStore
) -> tuple[Weights, dict]:
    """The model the round's (weighted) mean update leads to, from the secure sum or, under
    DP-FedAvg, from the clipped updates plus Gaussian noise of dp_noise_multiplier x dp_clip
    on their sum (divided by the number of sites chosen, fixed before training: McMahan et
    al.'s fixed denominator). The noise comes from the OS's random source: a seeded one could
    be subtracted by anyone who knows the seed."""
    import secrets

    from twin_core.privacy import FEDERATION, gaussian_noise, planned_fedavg_event

    floats = [k for k in start if start[k].dtype.kind == "f"]
    if updates.secure_sum_path:
        total = dict(store.load(updates.secure_sum_path).weights)
        weight = updates.secure_weight
    else:
        total = {k: np.zeros(start[k].shape, np.float64) for k in floats}
        for record in updates.updates:
            trained = store.load(record.path).weights
            for k in floats:
                total[k] += trained[k].astype(np.float64) - start[k]
        weight = float(len(updates.updates))
    facts: dict = {}
    if config.dp_clip > 0:
        weight = float(len(plan.selection.chosen))
        facts["dp_clip"] = config.dp_clip
        if config.dp_noise_multiplier > 0:
            std = config.dp_noise_multiplier * config.dp_clip
            # on the learnt parameters only: buffers (the standardisation moments) never
            # change in training, reveal nothing, and noise there would only damage the model
            learnt = _parameter_names(plan)
            noise = gaussian_noise(
                {k: v for k, v in total.items() if k in learnt}, std, secrets.randbits(128)
            )
            total = {k: total[k] + noise.get(k, 0.0) for k in total}
            facts.update(dp_noise_std=std, dp_noise_multiplier=config.dp_noise_multiplier)
            ledger = store.ledger()
            event = planned_fedavg_event(
                config.dp_noise_multiplier,
                len(plan.selection.chosen),
                max(len(plan.selection.compatible), 1),
            )
            ledger.record(
                plan.round_key, plan.privacy.get("campaign", "default"), FEDERATION, event
            )
            store.save_ledger(ledger)
    if not weight > 0:
        raise dg.Failure(f"round {plan.round_key}: the updates' total weight is {weight}")
    mean = dict(start)
    for k in floats:
        mean[k] = (start[k] + total[k] / weight).astype(start[k].dtype)
    norm = float(np.sqrt(sum(float(np.sum((total[k] / weight) ** 2)) for k in floats)))
    if not np.isfinite(norm) or norm > config.max_update_norm:
        raise dg.Failure(
            f"round {plan.round_key}: the aggregate update's norm {norm:.4g} is not finite or "
            f"exceeds max_update_norm {config.max_update_norm:g}"
        )
    facts["aggregate_delta_norm"] = round(norm, 6)
    return mean, facts


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
    facts_extra: dict = {}
    if site_updates.secure_sum_path or config.dp_clip > 0:
        # only the (noised) mean is known: the strategy (FedAvg or a server optimiser) steps
        # to it as to a single site's update
        mean, facts_extra = _mean_of_sum(round_plan, site_updates, config, start, store)
        updates_in = iter([(SiteContribution("mean", 1, 0, 0), mean)])
    else:
        # the weighted-mean family folds each update straight into WeightedMean, which checks
        # each page of the file as it folds it (one pass over the bytes); the strategies that
        # hand updates to other code get them checked in full first
        as_read = not strategy.needs_individual_updates and strategy.name != "scaffold"
        updates_in = (
            (
                SiteContribution(
                    u.site_id,
                    u.num_examples,
                    u.steps,
                    planned_steps(
                        config.local_epochs, config.batch_size, u.num_examples, config.local_steps
                    ),
                    round_plan.quality.get(u.site_id, 1.0),
                ),
                store.load(u.path, check_as_read=as_read).weights,
            )
            for u in sorted(site_updates.updates, key=lambda u: u.site_id)
        )
    weights, server_state, facts = aggregate(
        strategy,
        start,
        updates_in,
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
    facts.update(facts_extra)
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
