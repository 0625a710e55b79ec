"""End to end on real parts: site_worker processes over gRPC, a SQLite-backed Dagster instance,
a SQLite MLflow store. Covers both built-in tasks, the wire audit and killed sites."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from google.protobuf.descriptor import FieldDescriptor

from tests.conftest import SITES
from tests.pipelines.conftest import RoundEnv
from tests.pipelines.wire_recorder import RecordingFleet, audit_no_rows
from twin_pipelines.campaign import run_campaign, run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.definitions import build_definitions
from twin_pipelines.local_fleet import LocalFleet, SiteLaunch
from twin_pipelines.partitions import next_round_key
from twin_pipelines.resources import GrpcFleet, MlflowRegistry, RoundStore
from twin_wire import pki
from twin_wire.v1 import site_pb2 as pb

pytestmark = pytest.mark.integration
ROUND_ASSETS = (
    "round_plan",
    "site_updates",
    "global_model",
    "round_evaluation",
    "registered_model",
)


def _env(fleet, tmp: Path, mlflow_uri, name: str) -> RoundEnv:
    uri, artifacts = mlflow_uri
    store = RoundStore(root=str(tmp / f"rounds-{name}"))
    registry = MlflowRegistry(tracking_uri=uri, artifact_root=str(artifacts), model_name=name)
    return RoundEnv(build_definitions(fleet=fleet, store=store, registry=registry), store, registry)


def _endpoints(fleet: LocalFleet) -> str:
    return ",".join(f"{s}={a}" for s, a in fleet.endpoints().items())


@pytest.fixture(scope="module")
def twin_campaign(cohort_dir: Path, mlflow_uri, tmp_path_factory):
    """Four cohort sites as worker processes in production mode (mutual TLS), two rounds
    through Dagster, every message kept (as the orchestrator's code sends and receives it)."""
    tmp = tmp_path_factory.mktemp("integration")
    pki.init(tmp / "pki", list(SITES))
    launches = [
        SiteLaunch(
            s,
            data=cohort_dir / "sites" / f"{s}.csv",
            schema=cohort_dir / "schema.yaml",
            tls_dir=tmp / "pki",
        )
        for s in SITES
    ]
    with LocalFleet(tmp / "sites") as workers, dg.instance_for_test() as instance:
        workers.start(launches)
        fleet = RecordingFleet(endpoints=_endpoints(workers), tls_dir=str(tmp / "pki"))
        env = _env(fleet, tmp, mlflow_uri, "integration-twin")
        # plain FedAvg over mutual TLS, so the weight streams can be audited tensor by tensor
        # (production mode's default, secure aggregation: tests/pipelines/test_production_mode.py)
        plain = RoundConfig(min_sites=4, secure_aggregation=False)
        results = run_campaign(env.defs, instance, 2, plain)
        monitoring = env.defs.resolve_job_def("monitoring_job").execute_in_process(
            instance=instance
        )
        assert monitoring.success
        yield {
            "results": results,
            "env": env,
            "log": fleet.message_log(),
            "instance": instance,
            "cohort": cohort_dir,
            "workers": workers,
        }


def test_two_rounds_through_dagster_are_registered_in_mlflow(twin_campaign):
    results, env, instance = (
        twin_campaign["results"],
        twin_campaign["env"],
        twin_campaign["instance"],
    )
    assert [r.success for r in results] == [True, True], [r.error for r in results]
    assert [r.sites for r in results] == [SITES, SITES]
    assert results[1].pooled["loss"] < results[0].pooled["loss"]

    versions = env.versions()
    assert [str(v.version) for v in versions] == ["1", "2"]
    for version, result in zip(versions, results, strict=True):
        tags = version.tags
        assert tags["twin.round"] == result.round_key
        assert tags["twin.dagster_run_id"] == result.run_id
        assert tags["twin.sites"] == ",".join(SITES)
        assert tags["twin.strategy"] == "fedavg" and tags["twin.task"] == "patient_twin"
        examples = json.loads(tags["twin.site_examples"])
        assert sorted(examples) == list(SITES) and all(n > 0 for n in examples.values())
        assert float(tags["twin.pooled_loss"]) == pytest.approx(result.pooled["loss"])
        assert (
            "round " + result.round_key in version.description and "site-1" in version.description
        )
    assert env.alias("challenger") == "2" and env.alias("champion") == "2"

    for result in results:
        run = instance.get_run_by_id(result.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        for asset in ROUND_ASSETS:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert event is not None
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("round_evaluation"), asset_partitions=[result.round_key]
            ),
            limit=1,
        ).records
        metadata = records[0].asset_materialization.metadata
        assert metadata["pooled_loss"].value == pytest.approx(result.pooled["loss"])
        assert {r.data["site"] for r in metadata["sites"].records} == set(SITES)


# ---- the wire audit -------------------------------------------------------------------------
def test_the_campaign_ran_in_production_mode_over_mutual_tls(twin_campaign):
    from twin_core.errors import SiteCallError
    from twin_wire.client import GrpcSite

    workers = twin_campaign["workers"]
    for site in workers.sites.values():
        assert (
            f"site {site.site_id}: mutual TLS, answering orchestrator" in site.log_path.read_text()
        )
    site_id, address = next(iter(workers.endpoints().items()))
    plaintext = GrpcSite(site_id, address)
    with pytest.raises(SiteCallError) as refused:
        plaintext.info(timeout=5)
    plaintext.close()
    assert refused.value.code == "UNAVAILABLE"


def test_the_contract_has_no_field_that_can_carry_rows():
    """Only a tensor's shape is a repeated number; maps are named aggregates, not per-row lists."""
    repeated_scalars, maps = [], []
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if field.label != FieldDescriptor.LABEL_REPEATED:
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                maps.append(f"{message.name}.{field.name}")
            elif field.type != FieldDescriptor.TYPE_MESSAGE:
                repeated_scalars.append(f"{message.name}.{field.name}")
    # besides shapes, only lists of site ids (secure aggregation's who-shared / who-survived)
    assert sorted(repeated_scalars) == [
        "MaskingPlan.shared",
        "SecAggUnmask.survivors",
        "TensorSpec.shape",
    ]
    assert sorted(maps) == ["EvaluateReply.statistics", "SiteInfo.versions", "UpdateHeader.metrics"]


def test_no_row_level_data_on_the_wire(twin_campaign):
    log = twin_campaign["log"]
    methods = {m for m, _, _ in log.messages}
    assert methods == {
        f"/twin_wire.v1.SiteService/{m}"
        for m in ("GetInfo", "Train", "Evaluate", "CheckData", "Drift")
    }
    audit_no_rows(log, twin_campaign["cohort"], SITES)
    for _, _, message in log.messages:
        if isinstance(message, pb.TrainReply) and message.WhichOneof("part") == "header":
            assert set(message.header.metrics) == {"train_loss"}


def test_message_sizes_do_not_grow_with_a_site_s_rows(twin_campaign):
    """Site-4 holds 20x the patients of site-1; every non-weight reply is about the same size."""
    sizes: dict[tuple[str, str], int] = {}
    for _, direction, message in twin_campaign["log"].messages:
        if direction != "received":
            continue
        if isinstance(message, pb.EvaluateReply):
            sizes[("evaluate", message.site_id)] = message.ByteSize()
        elif isinstance(message, pb.DataCheckReply):
            sizes[("check", message.site_id)] = message.ByteSize()
        elif isinstance(message, pb.DriftReply):
            sizes[("drift", message.site_id)] = message.ByteSize()
        elif isinstance(message, pb.SiteInfo):
            sizes[("info", message.site_id)] = message.ByteSize()
        elif isinstance(message, pb.TrainReply) and message.WhichOneof("part") == "header":
            sizes[("update", message.header.site_id)] = message.header.ByteSize()
    for kind in ("evaluate", "info", "update", "check", "drift"):
        assert abs(sizes[(kind, "site-4")] - sizes[(kind, "site-1")]) <= 16, kind


def test_weight_streams_are_exactly_the_model_s_tensors(twin_campaign):
    """Every chunk stream reassembles to the tensors its header names, and only those."""
    from twin_core.schema import parse_schema
    from twin_core.tasks import task_for
    from twin_core.training import weights_of

    env = twin_campaign["env"]
    plan = env.store.read_json(twin_campaign["results"][0].round_key, "plan.json")
    model_specs = {
        (n, a.dtype.name, a.shape)
        for n, a in weights_of(task_for(parse_schema(plan["schema"])).build_model({}, 0)).items()
    }
    streams = 0
    for _, _, message in twin_campaign["log"].messages:
        header = None
        if (
            isinstance(message, (pb.TrainRequest, pb.TrainReply, pb.EvaluateRequest))
            and message.WhichOneof("part") == "header"
        ):
            header = message.header.weights
        if header is not None:
            streams += 1
            specs = {(t.name, t.dtype, tuple(t.shape)) for t in header.tensors}
            assert specs == model_specs
            assert header.total_bytes == sum(
                np.dtype(d).itemsize * int(np.prod(s)) for _, d, s in specs
            )
    assert streams >= 2 * (3 * len(SITES))  # per round: train request, update, evaluate request


# ---- killed sites ---------------------------------------------------------------------------
def _kill_when_training(workers: LocalFleet, site_id: str, round_key: str) -> threading.Thread:
    marker = f"train start site={site_id} round={round_key}"

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if marker in workers.sites[site_id].log_path.read_text(errors="replace"):
                workers.kill(site_id)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_site_killed_mid_round(mlflow_uri, tmp_path: Path):
    """Quorum holds: the round completes with the rest. Quorum lost: it fails, registers nothing."""
    launches = [SiteLaunch(s, synthetic=True) for s in ("site-1", "site-2", "site-3")]
    with LocalFleet(tmp_path / "sites") as workers, dg.instance_for_test() as instance:
        workers.start(launches)
        env = _env(
            GrpcFleet(endpoints=_endpoints(workers), insecure=True),
            tmp_path,
            mlflow_uri,
            "killed-site",
        )
        slow = RoundConfig(min_sites=2, local_epochs=60, info_timeout_s=5)

        watcher = _kill_when_training(workers, "site-3", next_round_key(instance))
        first = run_round(env.defs, instance, slow)
        watcher.join(timeout=5)
        assert first.success, first.error
        assert first.sites == ("site-1", "site-2") and first.failed_sites == ("site-3",)
        updates = env.store.round_dir(first.round_key) / "updates"
        assert sorted(p.name for p in updates.iterdir()) == ["site-1.twt", "site-2.twt"]
        assert [str(v.version) for v in env.versions()] == ["1"]

        watcher = _kill_when_training(workers, "site-2", next_round_key(instance))
        second = run_round(env.defs, instance, slow)
        watcher.join(timeout=5)
        assert not second.success
        assert (
            "quorum_met" in second.error
            and "1 site(s) returned a valid update; quorum is 2" in second.error
        )
        assert "site-2: UNAVAILABLE" in second.error
        assert [str(v.version) for v in env.versions()] == ["1"]  # nothing registered
        assert env.store.latest_passed()["round"] == first.round_key  # start point untouched
        kept = env.store.round_dir(second.round_key) / "updates"
        assert [p.name for p in kept.iterdir()] == ["site-1.twt"]  # what arrived is kept

        third = run_round(env.defs, instance, slow)  # one site left: refused before training
        assert not third.success and "needs 2 healthy site(s), found 1" in third.error


# ---- the second task: plain tabular supervised learning -------------------------------------
def _tabular_sites(folder: Path) -> Path:
    """Three hospitals' tables (classification, with a categorical feature) and their schema."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "schema.yaml").write_text(
        'task: tabular\nproblem: classification\ntarget: readmitted\nclasses: ["no", "yes"]\n'
        "id_column: record\nhidden: [32, 32]\nfeatures:\n"
        "  - {name: age, kind: numeric, min: 0, max: 120}\n"
        "  - {name: creatinine, kind: numeric}\n"
        "  - {name: ward, kind: categorical, categories: [icu, general, surgery]}\n"
    )
    rng = np.random.default_rng(5)
    for i, n in enumerate((120, 300, 600)):
        age = rng.normal(60 + 5 * i, 12, n).clip(18, 95).round(1)
        creat = rng.lognormal(0.1 * i, 0.4, n).round(3)
        ward = rng.choice(["icu", "general", "surgery"], n, p=[0.2, 0.6, 0.2])
        logit = 0.04 * (age - 60) + 1.5 * (creat - 1.1) + np.where(ward == "icu", 1.0, -0.3)
        readmitted = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
        pd.DataFrame(
            {
                "record": [f"h{i}-{k}" for k in range(n)],
                "age": age,
                "creatinine": creat,
                "ward": ward,
                "readmitted": readmitted,
            }
        ).to_csv(folder / f"hospital-{i}.csv", index=False)
    return folder


def test_a_site_killed_mid_round_under_secure_aggregation(mlflow_uri, tmp_path: Path):
    """A worker process dies while training, after it shared its mask seeds: the others' pair
    masks with it are removed through their shares, and the sum of the two survivors is the
    plain FedAvg of the two."""
    launches = [SiteLaunch(s, synthetic=True) for s in ("site-1", "site-2", "site-3")]
    with LocalFleet(tmp_path / "sites") as workers, dg.instance_for_test() as instance:
        workers.start(launches)
        env = _env(
            GrpcFleet(endpoints=_endpoints(workers), insecure=True),
            tmp_path,
            mlflow_uri,
            "killed-site-secagg",
        )
        slow = RoundConfig(min_sites=2, local_epochs=60, info_timeout_s=5, secure_aggregation=True)
        key = next_round_key(instance)
        watcher = _kill_when_training(workers, "site-3", key)
        result = run_round(env.defs, instance, slow)
        watcher.join(timeout=5)
    assert result.success, result.error
    assert result.sites == ("site-1", "site-2") and result.failed_sites == ("site-3",)
    shared = env.store.read_json(key, "plan.json")["config"]
    assert shared["secure_aggregation"] is True
    from twin_core.weights import load_weights

    secure_sum = load_weights(env.store.round_dir(key) / "secure_sum.twt")
    assert secure_sum.meta["sites"] == ["site-1", "site-2"]
    stored = sorted(p.stem for p in (env.store.round_dir(key) / "updates").glob("*.twt"))
    assert stored == ["site-1", "site-2"]
    for site in stored:
        masked = load_weights(env.store.round_dir(key) / "updates" / f"{site}.twt").weights
        assert list(masked) == ["secagg.masked"]


def test_tabular_task_runs_through_the_same_pipeline(mlflow_uri, tmp_path: Path):
    data = _tabular_sites(tmp_path / "data")
    launches = [
        SiteLaunch(f"hospital-{i}", data=data / f"hospital-{i}.csv", schema=data / "schema.yaml")
        for i in range(3)
    ]
    with LocalFleet(tmp_path / "sites") as workers, dg.instance_for_test() as instance:
        workers.start(launches)
        env = _env(
            GrpcFleet(endpoints=_endpoints(workers), insecure=True),
            tmp_path,
            mlflow_uri,
            "integration-tabular",
        )
        results = run_campaign(
            env.defs, instance, 2, RoundConfig(min_sites=3, local_epochs=3, learning_rate=3e-3)
        )
    assert [r.success for r in results] == [True, True], [r.error for r in results]
    assert results[1].pooled["loss"] < results[0].pooled["loss"]
    assert 0.5 < results[1].pooled["accuracy"] <= 1.0
    versions = env.versions()
    assert [v.tags["twin.task"] for v in versions] == ["tabular", "tabular"]
    assert "A tabular model" in versions[-1].description
