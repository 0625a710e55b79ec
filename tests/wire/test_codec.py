"""Tests for twin_wire.codec: chunked weight streams and protobuf <-> twin_core mappings."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from twin_core.errors import MalformedStream
from twin_core.federation import ColumnMoments, SiteEvaluation, SiteInfo, SiteUpdate, TrainConfig
from twin_core.weights import (
    Manifest,
    TensorSpec,
    manifest_of,
    weights_from_buffer,
    weights_to_bytes,
)
from twin_wire.codec import (
    CHUNK_BYTES,
    WeightsAssembler,
    config_from_proto,
    config_to_proto,
    evaluate_requests,
    evaluation_from_proto,
    evaluation_to_proto,
    info_from_proto,
    info_to_proto,
    manifest_from_proto,
    manifest_to_proto,
    read_evaluate_requests,
    read_train_replies,
    read_train_requests,
    train_replies,
    train_requests,
    weight_chunks,
)
from twin_wire.v1 import site_pb2 as pb


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embed": rng.normal(size=(7, 5)).astype(np.float32),
        "bias": rng.normal(size=3).astype(np.float64),
        "half": rng.normal(size=(2, 2)).astype(np.float16),
        "steps": np.array(42, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "small": np.array([-1, 0, 1], dtype=np.int8),
    }


def _assert_bit_exact(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def _assemble(manifest: Manifest, chunks) -> dict:
    asm = WeightsAssembler(manifest)
    for c in chunks:
        asm.add(c)
    return asm.finish()


# ---- chunking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [1, 7, 16, 64, 100, 1000, CHUNK_BYTES])
def test_chunks_bounded_contiguous_and_complete(chunk_bytes):
    w = _model()
    raw = weights_to_bytes(w)
    chunks = list(weight_chunks(w, chunk_bytes))
    assert all(0 < len(c.data) <= chunk_bytes for c in chunks)
    # every chunk but the last is full
    assert all(len(c.data) == chunk_bytes for c in chunks[:-1])
    offset = 0
    for c in chunks:
        assert c.offset == offset
        offset += len(c.data)
    assert offset == len(raw)
    assert b"".join(c.data for c in chunks) == raw
    assert len(chunks) == -(-len(raw) // chunk_bytes)


def test_large_tensor_split_at_chunk_bytes():
    big = {"w": np.arange((CHUNK_BYTES * 5) // 8 + 3, dtype=np.float32)}  # 2.5 MiB + 12 bytes
    raw = weights_to_bytes(big)
    chunks = list(weight_chunks(big))
    assert [len(c.data) for c in chunks] == [CHUNK_BYTES, CHUNK_BYTES, len(raw) - 2 * CHUNK_BYTES]
    assert [c.offset for c in chunks] == [0, CHUNK_BYTES, 2 * CHUNK_BYTES]
    assert max(c.ByteSize() for c in chunks) < 4 * 1024 * 1024  # well under gRPC's limit
    _assert_bit_exact(_assemble(manifest_of(big), chunks), big)


def test_small_tensors_packed_into_one_chunk():
    w = {f"t{i}": np.full(3, i, dtype=np.float32) for i in range(50)}
    chunks = list(weight_chunks(w))
    assert len(chunks) == 1
    assert chunks[0].offset == 0 and chunks[0].data == weights_to_bytes(w)


def test_chunk_boundary_at_tensor_boundary():
    w = {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)}  # 16 + 16 bytes
    chunks = list(weight_chunks(w, 16))
    assert [(c.offset, c.data) for c in chunks] == [
        (0, np.zeros(4, np.float32).tobytes()),
        (16, np.ones(4, np.float32).tobytes()),
    ]


def test_no_weights_no_chunks_and_empty_stream_assembles():
    assert list(weight_chunks({})) == []
    assert _assemble(manifest_of({}), []) == {}


@pytest.mark.parametrize("chunk_bytes", [5, 64, CHUNK_BYTES])
def test_assembler_round_trip_bit_exact(chunk_bytes):
    w = _model()
    manifest = manifest_of(w)
    got = _assemble(manifest, weight_chunks(w, chunk_bytes))
    _assert_bit_exact(got, w)
    _assert_bit_exact(weights_from_buffer(manifest, weights_to_bytes(got)), w)


def test_manifest_proto_round_trip():
    m = manifest_of(_model())
    assert manifest_from_proto(manifest_to_proto(m)) == m
    again = pb.WeightsHeader.FromString(manifest_to_proto(m).SerializeToString())
    assert manifest_from_proto(again) == m


# ---- malformed streams -----------------------------------------------------------------------
def _chunks(w, size=16) -> list[pb.Chunk]:
    return list(weight_chunks(w, size))


def test_assembler_rejects_out_of_order_offset():
    w = _model()
    chunks = _chunks(w)
    asm = WeightsAssembler(manifest_of(w))
    asm.add(chunks[0])
    with pytest.raises(MalformedStream, match="chunk at offset 32, expected 16"):
        asm.add(chunks[2])


def test_assembler_rejects_repeated_chunk():
    w = _model()
    chunks = _chunks(w)
    asm = WeightsAssembler(manifest_of(w))
    asm.add(chunks[0])
    with pytest.raises(MalformedStream, match="chunk at offset 0, expected 16"):
        asm.add(chunks[0])


def test_assembler_rejects_truncated_stream():
    w = _model()
    manifest = manifest_of(w)
    with pytest.raises(
        MalformedStream, match=f"stream ended after 32 of {manifest.total_bytes} bytes"
    ):
        _assemble(manifest, _chunks(w)[:2])


def test_assembler_rejects_extra_bytes():
    w = _model()
    manifest = manifest_of(w)
    chunks = _chunks(w)
    extra = pb.Chunk(offset=manifest.total_bytes, data=b"\x00")
    with pytest.raises(MalformedStream, match=f"runs past the {manifest.total_bytes} bytes"):
        _assemble(manifest, [*chunks, extra])
    last = chunks[-1]
    longer = pb.Chunk(offset=last.offset, data=last.data + b"\x00\x00")
    with pytest.raises(MalformedStream, match="runs past"):
        _assemble(manifest, [*chunks[:-1], longer])


def test_assembler_rejects_checksum_mismatch():
    w = _model()
    chunks = _chunks(w)
    data = bytearray(chunks[1].data)
    data[3] ^= 0x40
    chunks[1] = pb.Chunk(offset=chunks[1].offset, data=bytes(data))
    with pytest.raises(MalformedStream, match="SHA-256"):
        _assemble(manifest_of(w), chunks)


def test_assembler_rejects_bad_header():
    bad = Manifest((TensorSpec("x", "object", (1,)),), 8, "0" * 64)
    with pytest.raises(MalformedStream, match="bad weights header.*unsupported dtype 'object'"):
        WeightsAssembler(bad)
    short = Manifest((TensorSpec("x", "float32", (4,)),), 15, "0" * 64)
    with pytest.raises(MalformedStream, match="bad weights header"):
        WeightsAssembler(short)


def _train_header(w) -> pb.TrainHeader:
    return pb.TrainHeader(
        site_id="site-1",
        round_key="2024-01-01",
        schema_fingerprint="abcd",
        config=config_to_proto(TrainConfig(seed=9)),
        weights=manifest_to_proto(manifest_of(w)),
    )


def _requests(w, size: int = 16) -> list[pb.TrainRequest]:
    return [pb.TrainRequest(header=_train_header(w))] + [
        pb.TrainRequest(chunk=c) for c in weight_chunks(w, size)
    ]


def test_hand_built_train_requests_read_back():
    w = _model()
    call = read_train_requests(_requests(w))
    assert (call.site_id, call.round_key, call.schema_fingerprint) == (
        "site-1",
        "2024-01-01",
        "abcd",
    )
    assert call.config == TrainConfig(seed=9)
    _assert_bit_exact(call.weights, w)


def _swap(messages, i, j):
    messages = list(messages)
    messages[i], messages[j] = messages[j], messages[i]
    return messages


def _flip_byte(messages, index):
    messages = list(messages)
    chunk = messages[index].chunk
    data = bytearray(chunk.data)
    data[0] ^= 0xFF
    messages[index] = pb.TrainRequest(chunk=pb.Chunk(offset=chunk.offset, data=bytes(data)))
    return messages


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda m: _swap(m, 1, 2), r"chunk at offset 16, expected 0"),
        (lambda m: m[:-1], r"stream ended after"),
        (lambda m: [m[0]], r"stream ended after 0 of"),
        (
            lambda m: [*m, pb.TrainRequest(chunk=pb.Chunk(offset=10**6, data=b"x"))],
            r"chunk at offset",
        ),
        (
            lambda m: [
                *m,
                pb.TrainRequest(
                    chunk=pb.Chunk(offset=sum(len(x.chunk.data) for x in m[1:]), data=b"xy")
                ),
            ],
            r"runs past",
        ),
        (lambda m: _flip_byte(m, 2), r"SHA-256"),
        (lambda m: m[1:], r"must start with a header"),
        (lambda m: [], r"must start with a header"),
        (lambda m: [pb.TrainRequest(), *m[1:]], r"must start with a header"),
        (lambda m: [m[0], m[1], m[0], *m[2:]], r"second header"),
        (lambda m: [*m, m[0]], r"second header"),
        (lambda m: [m[0], pb.TrainRequest(), *m[1:]], r"neither header nor chunk"),
    ],
    ids=[
        "out-of-order",
        "truncated",
        "header-only",
        "gap",
        "extra-bytes",
        "checksum",
        "no-header",
        "empty-stream",
        "empty-first-message",
        "second-header-mid",
        "second-header-end",
        "unset-part-mid",
    ],
)
def test_read_train_requests_rejects_malformed(mutate, pattern):
    with pytest.raises(MalformedStream, match=pattern):
        read_train_requests(mutate(_requests(_model())))


def test_header_declaring_other_checksum_rejected():
    w = _model()
    msgs = _requests(w)
    msgs[0].header.weights.sha256 = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(MalformedStream, match="SHA-256"):
        read_train_requests(msgs)


def test_header_without_weights_rejected():
    w = _model()
    msgs = _requests(w)
    msgs[0].header.ClearField("weights")
    with pytest.raises(MalformedStream):
        read_train_requests(msgs)


def test_stream_reader_accepts_a_generator():
    w = _model()
    call = read_train_requests(m for m in _requests(w))
    _assert_bit_exact(call.weights, w)


# ---- value mappings ---------------------------------------------------------------------------
def _info() -> SiteInfo:
    return SiteInfo(
        site_id="site-3",
        task="patient_twin",
        schema={"task": "patient_twin", "horizon": 6, "features": [{"name": "age", "min": 18}]},
        schema_fingerprint="0123456789abcdef",
        units=150,
        train_examples=612,
        holdout_examples=151,
        moments=(
            ColumnMoments("age", 120.0, 7800.5, 512345.25),
            ColumnMoments("y", 700.0, -12.125, 1e6 + 0.1),
        ),
        versions={"twin_pipelines": "0.1.0", "torch": "2.13.0", "protocol": "v1"},
    )


def test_info_round_trip():
    info = _info()
    msg = info_to_proto(info)
    assert info_from_proto(msg) == info
    assert info_from_proto(pb.SiteInfo.FromString(msg.SerializeToString())) == info


def test_info_with_empty_schema_and_no_moments():
    info = SiteInfo("s", "tabular", {}, "", 0, 0, 0, ())
    assert info_from_proto(info_to_proto(info)) == info


def test_evaluation_round_trip():
    ev = SiteEvaluation(
        site_id="site-2",
        round_key="2024-03-01",
        num_examples=87,
        statistics={"n": 87.0, "sum_nll": -12.5, "sum_abs": 33.25, "h1_n": 10.0},
        eval_seconds=0.125,
    )
    msg = evaluation_to_proto(ev)
    assert evaluation_from_proto(msg) == ev
    assert evaluation_from_proto(pb.EvaluateReply.FromString(msg.SerializeToString())) == ev


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(),
        TrainConfig(
            local_epochs=3,
            batch_size=17,
            learning_rate=0.0123,
            seed=2**63 - 1,
            weight_decay=1e-4,
            optimizer="sgd",
        ),
        TrainConfig(seed=0, optimizer="adam"),
    ],
    ids=["defaults", "everything", "seed-zero"],
)
def test_config_round_trip(config):
    msg = config_to_proto(config)
    assert config_from_proto(msg) == config
    assert config_from_proto(pb.TrainConfig.FromString(msg.SerializeToString())) == config


def test_config_from_proto_defaults_optimizer_to_adam():
    assert config_from_proto(pb.TrainConfig(local_epochs=1, batch_size=8)).optimizer == "adam"


# ---- whole streams ----------------------------------------------------------------------------
def _wire(messages, cls):
    """Serialise and parse each message, as gRPC would."""
    return [cls.FromString(m.SerializeToString()) for m in messages]


def test_train_requests_round_trip():
    w = _model()
    config = TrainConfig(local_epochs=2, batch_size=32, learning_rate=0.01, seed=123456789)
    msgs = _wire(train_requests("site-4", "r7", "fp", config, w), pb.TrainRequest)
    assert msgs[0].WhichOneof("part") == "header"
    assert all(m.WhichOneof("part") == "chunk" for m in msgs[1:])
    call = read_train_requests(msgs)
    assert call.site_id == "site-4" and call.round_key == "r7" and call.schema_fingerprint == "fp"
    assert call.config == config
    _assert_bit_exact(call.weights, w)


def test_train_replies_round_trip_site_update_exactly():
    big = dict(_model(), big=np.linspace(0, 1, (3 * CHUNK_BYTES) // 4 + 5, dtype=np.float32))
    update = SiteUpdate(
        site_id="site-5",
        round_key="2024-06-01",
        weights=big,
        num_examples=1234,
        steps=77,
        metrics={"train_loss": 0.123456789, "other": -1.5},
        train_seconds=12.5,
    )
    msgs = _wire(train_replies(update), pb.TrainReply)
    assert len(msgs) == 1 + 4  # header + 3 MiB and a bit in 1 MiB chunks
    assert all(m.ByteSize() <= CHUNK_BYTES + 64 for m in msgs[1:])
    back = read_train_replies(msgs)
    assert (back.site_id, back.round_key, back.num_examples, back.steps) == (
        "site-5",
        "2024-06-01",
        1234,
        77,
    )
    assert back.metrics == update.metrics
    assert back.train_seconds == update.train_seconds
    _assert_bit_exact(back.weights, update.weights)


def test_train_replies_checksum_in_trailer_matches_weights():
    # fresh weights: the header has the layout, the last chunk the SHA-256 (hashed as sent)
    update = SiteUpdate("s", "r", _model(), 1, 1, {}, 0.0)
    msgs = list(train_replies(update))
    expected = manifest_of(update.weights)
    header = manifest_from_proto(msgs[0].header.weights)
    assert (header.tensors, header.total_bytes, header.sha256) == (
        expected.tensors,
        expected.total_bytes,
        "",
    )
    assert [m.chunk.sha256 for m in msgs[1:]] == [""] * (len(msgs) - 2) + [expected.sha256]


def test_evaluate_requests_round_trip():
    w = _model()
    msgs = _wire(evaluate_requests("site-1", "r2", "fp2", w), pb.EvaluateRequest)
    call = read_evaluate_requests(msgs)
    assert (call.site_id, call.round_key, call.schema_fingerprint) == ("site-1", "r2", "fp2")
    _assert_bit_exact(call.weights, w)


def test_train_replies_malformed_rejected():
    update = SiteUpdate("s", "r", _model(), 1, 1, {}, 0.0)
    msgs = list(train_replies(update))
    with pytest.raises(MalformedStream, match="must start with a header"):
        read_train_replies(msgs[1:])
    with pytest.raises(MalformedStream, match="stream ended after 0"):
        read_train_replies(msgs[:1])


# ---- the SHA-256 in a trailer, and a SHA-256 already known -------------------------------------
def _layout_only(w) -> Manifest:
    m = manifest_of(w)
    return Manifest(m.tensors, m.total_bytes, "")


def test_trailer_carries_the_sha256_on_the_last_chunk_only():
    w = _model()
    chunks = list(weight_chunks(w, 16, trailer=True))
    assert [c.sha256 for c in chunks] == [""] * (len(chunks) - 1) + [manifest_of(w).sha256]
    _assert_bit_exact(_assemble(_layout_only(w), chunks), w)


def test_empty_model_streams_one_empty_chunk_with_the_trailer():
    chunks = list(weight_chunks({}, 16, trailer=True))
    assert len(chunks) == 1 and chunks[0].data == b""
    assert chunks[0].sha256 == manifest_of({}).sha256
    assert _assemble(_layout_only({}), chunks) == {}


def test_assembler_rejects_wrong_trailer_digest():
    w = _model()
    chunks = list(weight_chunks(w, 16, trailer=True))
    chunks[-1] = pb.Chunk(offset=chunks[-1].offset, data=chunks[-1].data, sha256="0" * 64)
    with pytest.raises(MalformedStream, match="SHA-256 of the received weights does not match"):
        _assemble(_layout_only(w), chunks)


def test_assembler_rejects_corrupt_chunk_under_a_trailer():
    w = _model()
    chunks = list(weight_chunks(w, 16, trailer=True))
    data = bytearray(chunks[2].data)
    data[0] ^= 0x01
    chunks[2] = pb.Chunk(offset=chunks[2].offset, data=bytes(data))
    with pytest.raises(MalformedStream, match="SHA-256 of the received weights does not match"):
        _assemble(_layout_only(w), chunks)


def test_assembler_rejects_stream_without_any_sha256():
    w = _model()
    with pytest.raises(MalformedStream, match="without its SHA-256"):
        _assemble(_layout_only(w), list(weight_chunks(w, 16)))


def test_assembler_rejects_truncated_stream_under_a_trailer():
    w = _model()
    chunks = list(weight_chunks(w, 16, trailer=True))
    with pytest.raises(MalformedStream, match="stream ended after"):
        _assemble(_layout_only(w), chunks[:-1])  # the trailer went with the last chunk
    # a truncated stream whose last chunk still claims the trailer: the length check first
    cut = pb.Chunk(offset=chunks[1].offset, data=chunks[1].data, sha256=chunks[-1].sha256)
    with pytest.raises(MalformedStream, match="stream ended after 32 of"):
        _assemble(_layout_only(w), [chunks[0], cut])


def test_assembler_rejects_a_chunk_after_the_trailer():
    w = _model()
    chunks = list(weight_chunks(w, 16, trailer=True))
    early = pb.Chunk(offset=chunks[0].offset, data=chunks[0].data, sha256=chunks[-1].sha256)
    with pytest.raises(MalformedStream, match="after the chunk that carried the checksum"):
        _assemble(_layout_only(w), [early, *chunks[1:]])


def test_assembler_rejects_trailer_that_contradicts_the_header():
    w = _model()
    chunks = list(weight_chunks(w, 16, trailer=True))
    chunks[-1] = pb.Chunk(offset=chunks[-1].offset, data=chunks[-1].data, sha256="f" * 64)
    with pytest.raises(MalformedStream, match="differs from the header"):
        _assemble(manifest_of(w), chunks)


def test_streams_of_fresh_weights_round_trip_with_a_trailer():
    w = _model()
    msgs = _wire(evaluate_requests("s", "r", "fp", w), pb.EvaluateRequest)
    assert msgs[0].header.weights.sha256 == ""
    assert msgs[-1].chunk.sha256 == manifest_of(w).sha256
    call = read_evaluate_requests(msgs)
    _assert_bit_exact(call.weights, w)


def test_received_weights_are_read_only_and_carry_their_checked_manifest():
    from twin_core.weights import known_manifest

    w = _model()
    got = read_evaluate_requests(_wire(evaluate_requests("s", "r", "fp", w), pb.EvaluateRequest))
    assert known_manifest(got.weights) == manifest_of(w)
    assert not any(a.flags.writeable for a in got.weights.values())


def test_known_sha256_travels_in_the_header_and_is_not_recomputed(tmp_path, monkeypatch):
    import twin_wire.codec as codec
    from twin_core.weights import load_weights, save_weights

    w = _model()
    save_weights(tmp_path / "m.twt", w)
    stored = load_weights(tmp_path / "m.twt").weights

    class NoHashing:
        def __init__(self):
            raise AssertionError("the sender hashed a model whose SHA-256 it knew")

    monkeypatch.setattr(codec, "_Hasher", NoHashing)
    msgs = _wire(evaluate_requests("s", "r", "fp", stored), pb.EvaluateRequest)
    assert msgs[0].header.weights.sha256 == manifest_of(w).sha256
    assert all(not m.chunk.sha256 for m in msgs[1:])
    monkeypatch.undo()
    _assert_bit_exact(read_evaluate_requests(msgs).weights, w)


def test_received_update_is_saved_without_hashing_again(tmp_path, monkeypatch):
    import twin_core.weights as weights_module
    from twin_core.weights import load_weights, save_weights

    update = SiteUpdate("s", "r", _model(), 1, 1, {}, 0.0)
    back = read_train_replies(_wire(train_replies(update), pb.TrainReply))

    def no_hashing(_weights):
        raise AssertionError("hashed again")

    monkeypatch.setattr(weights_module, "manifest_of", no_hashing)
    assert save_weights(tmp_path / "u.twt", back.weights).sha256 == manifest_of(_model()).sha256
    _assert_bit_exact(load_weights(tmp_path / "u.twt").weights, _model())
