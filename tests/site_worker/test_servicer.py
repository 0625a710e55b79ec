"""The site worker's gRPC face, on a real grpc server bound to a free localhost port."""

from __future__ import annotations

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from site_worker.handler import SiteHandler
from site_worker.server import SiteServer
from twin_core.errors import SiteCallError
from twin_core.federation import TrainConfig
from twin_core.schema import check_frame, parse_schema
from twin_core.training import weights_of
from twin_wire import codec
from twin_wire.client import GrpcSite
from twin_wire.v1 import site_pb2 as pb
from twin_wire.v1 import site_pb2_grpc


@pytest.fixture(scope="module")
def server(request):
    handler = request.getfixturevalue("make_handler")("site-1")
    srv = SiteServer({"site-1": handler}, "127.0.0.1", 0)
    srv.start()
    yield srv, handler
    srv.stop(grace=1)


@pytest.fixture
def client(server):
    srv, _ = server
    site = GrpcSite("site-1", f"127.0.0.1:{srv.port}")
    yield site
    site.close()


def _start_weights(handler: SiteHandler):
    info = handler.info()
    from twin_core.federation import pool_moments

    return weights_of(handler.task.build_model(pool_moments([info.moments]), seed=3))


def test_health_check_serves(server):
    srv, _ = server
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "twin_wire.v1.SiteService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_info_has_counts_and_fingerprint(client, server):
    _, handler = server
    info = client.info(timeout=5)
    assert info.site_id == "site-1" and info.task == "patient_twin"
    assert info.schema_fingerprint == handler.schema.fingerprint
    assert info.units == 20 and info.train_examples > 0 and info.holdout_examples > 0
    assert info.versions["protocol"] == "twin_wire.v1"
    assert {m.column for m in info.moments} == {"age", "bmi", "sex=0", "sex=1", "y"}


def test_train_and_evaluate_over_grpc(client, server):
    _, handler = server
    start = _start_weights(handler)
    update = client.train(
        "r0001", handler.schema.fingerprint, TrainConfig(seed=1), start, timeout=60
    )
    assert list(update.weights) == list(start)
    assert all(update.weights[k].shape == v.shape for k, v in start.items())
    assert update.num_examples == handler.data.train_examples and update.steps > 0
    assert any(not np.array_equal(update.weights[k], v) for k, v in start.items())
    evaluation = client.evaluate("r0001", handler.schema.fingerprint, update.weights, timeout=60)
    assert set(evaluation.statistics) == set(handler.task.statistic_names)
    assert evaluation.num_examples == handler.data.holdout_examples


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.code


def test_unknown_site_is_not_found(server):
    srv, handler = server
    stranger = GrpcSite("site-9", f"127.0.0.1:{srv.port}")
    with pytest.raises(SiteCallError) as exc:
        stranger.info(timeout=5)
    assert exc.value.code == "NOT_FOUND" and "unknown site 'site-9'" in exc.value.message
    with pytest.raises(SiteCallError) as exc:
        stranger.train("r1", handler.schema.fingerprint, TrainConfig(), _start_weights(handler), 10)
    assert exc.value.code == "NOT_FOUND"


def test_other_schema_is_refused(client, server):
    _, handler = server
    with pytest.raises(SiteCallError) as exc:
        client.train("r1", "0123456789abcdef", TrainConfig(), _start_weights(handler), 10)
    assert exc.value.code == "FAILED_PRECONDITION" and "schema" in exc.value.message


@pytest.mark.parametrize("damage", ["missing", "shape", "dtype"])
def test_incompatible_model_is_refused(client, server, damage):
    _, handler = server
    weights = dict(_start_weights(handler))
    name = "net.0.weight"
    if damage == "missing":
        del weights[name]
    elif damage == "shape":
        weights[name] = np.zeros((3, 3), np.float32)
    else:
        weights[name] = weights[name].astype(np.float64)
    with pytest.raises(SiteCallError) as exc:
        client.train("r1", handler.schema.fingerprint, TrainConfig(), weights, 10)
    assert exc.value.code == "INVALID_ARGUMENT" and "incompatible model" in exc.value.message


def _raw_train(port: int, messages: list[pb.TrainRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = site_pb2_grpc.SiteServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Train(iter(messages), timeout=10))
    return exc.value


def test_malformed_chunk_streams_are_refused(server):
    srv, handler = server
    good = list(
        codec.train_requests(
            "site-1", "r1", handler.schema.fingerprint, TrainConfig(), _start_weights(handler)
        )
    )
    header, chunks = good[0], good[1:]
    first = chunks[0].chunk
    cases = {
        "no header": chunks,
        "wrong offset": [header, pb.TrainRequest(chunk=pb.Chunk(offset=7, data=first.data))],
        "truncated": [header, pb.TrainRequest(chunk=pb.Chunk(offset=0, data=first.data[:-4]))],
        "checksum": [
            header,
            pb.TrainRequest(chunk=pb.Chunk(offset=0, data=b"\x01" + first.data[1:])),
        ],
        "two headers": [header, header, *chunks],
    }
    for label, messages in cases.items():
        error = _raw_train(srv.port, messages)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert "malformed chunk stream" in error.details(), (label, error.details())


def test_model_far_above_grpc_message_limit_round_trips():
    """A 27 MB model (gRPC's default message limit is 4 MiB) trains and comes back intact."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x1": rng.normal(size=120), "x2": rng.normal(size=120)})
    frame["y"] = 2 * frame.x1 - frame.x2 + rng.normal(scale=0.1, size=120)
    schema = parse_schema(
        {
            "task": "tabular",
            "target": "y",
            "hidden": [2600, 2600],
            "features": [{"name": "x1"}, {"name": "x2"}],
        }
    )
    handler = SiteHandler("big", schema, check_frame(schema, frame))
    srv = SiteServer({"big": handler}, "127.0.0.1", 0)
    srv.start()
    try:
        site = GrpcSite("big", f"127.0.0.1:{srv.port}")
        start = weights_of(handler.task.build_model({}, seed=0))
        nbytes = sum(a.nbytes for a in start.values())
        assert nbytes > 20e6
        update = site.train(
            "r1", schema.fingerprint, TrainConfig(batch_size=64), start, timeout=120
        )
        assert sum(a.nbytes for a in update.weights.values()) == nbytes
        assert update.steps == 2
        evaluation = site.evaluate("r1", schema.fingerprint, update.weights, timeout=120)
        assert evaluation.statistics["n"] == handler.data.holdout_examples
        site.close()
    finally:
        srv.stop(grace=1)


def test_data_check_and_drift_over_grpc(client, server):
    _, handler = server
    report = client.check_data(timeout=60)
    assert report.success and report.rows == len(handler.frame)
    assert [o.expectation for o in report.outcomes][:3] == [
        "expect_table_columns_to_match_set",
        "expect_column_values_to_be_in_type_list",
        "expect_column_values_to_be_between",
    ]
    drift = client.drift(timeout=60)
    assert drift.site_id == "site-1" and drift.report_html == b""
    assert drift.has_reference == (handler._reference is not None)


def test_a_failing_data_check_refuses_training_with_its_reasons(make_handler):
    healthy = make_handler("site-2")
    frame = healthy.frame.copy()
    frame.loc[frame.index[:30], "bmi"] = None  # beyond the 5 % missingness limit
    handler = SiteHandler("site-2", healthy.schema, frame)
    srv = SiteServer({"site-2": handler}, "127.0.0.1", 0)
    srv.start()
    try:
        site = GrpcSite("site-2", f"127.0.0.1:{srv.port}")
        info = site.info(timeout=30)
        assert (
            not info.data_check_passed
            and "expect_column_values_to_not_be_null(bmi)" in info.data_check_summary
        )
        with pytest.raises(SiteCallError) as exc:
            site.train("r1", handler.schema.fingerprint, TrainConfig(), _start_weights(handler), 30)
        assert exc.value.code == "FAILED_PRECONDITION"
        assert exc.value.message.startswith("data check failed: 1 of 14 expectations failed")
        site.close()
    finally:
        srv.stop(grace=1)
