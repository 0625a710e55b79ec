"""Update compression (twin_core.compression): hand-computed small examples of each method,
error feedback, and the refusals of a corrupt payload."""

from __future__ import annotations

import numpy as np
import pytest

from twin_core.compression import (
    MARKER,
    decode_update,
    encode_update,
    method_of,
    payload_bytes,
    receive_update,
    topk_count,
)
from twin_core.errors import InvalidWeights


def _model(values, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"w": np.asarray(values, dtype)}


def test_int8_scale_is_max_abs_over_127_and_rounds_half_to_even():
    start = _model([0, 0, 0, 0])
    trained = _model([254, -127, 2.5, 0.5])
    payload, residual = encode_update(trained, start, "int8")
    # scale = 254 / 127 = 2; x / scale = [127, -63.5, 1.25, 0.25]
    assert payload["w::scale"].dtype == np.float32
    assert payload["w::scale"].tolist() == [2.0]
    assert payload["w::int8"].dtype == np.int8
    assert payload["w::int8"].tolist() == [127, -64, 1, 0]  # -63.5 -> -64: half to even
    assert residual["w"].tolist() == [0.0, 1.0, 0.5, 0.5]
    assert method_of(payload) == "int8"
    assert decode_update(payload, start)["w"].tolist() == [254, -128, 2, 0]


def test_int8_of_an_all_zero_delta_has_scale_zero():
    start = _model([1, 2])
    payload, residual = encode_update(dict(start), start, "int8")
    assert payload["w::scale"].tolist() == [0.0]
    assert payload["w::int8"].tolist() == [0, 0]
    assert decode_update(payload, start)["w"].tolist() == [1, 2]
    assert residual["w"].tolist() == [0.0, 0.0]


def test_float16_round_trip_is_exact_for_representable_deltas():
    start = _model([1.0, 1.0, 1.0, 1.0])
    trained = _model([1.5, -2.25, 1025.0, 1.0])  # deltas 0.5, -3.25, 1024, 0
    payload, residual = encode_update(trained, start, "float16")
    assert payload["w::float16"].dtype == np.float16
    assert payload["w::float16"].tolist() == [0.5, -3.25, 1024.0, 0.0]
    assert decode_update(payload, start)["w"].tolist() == [1.5, -2.25, 1025.0, 1.0]
    assert residual["w"].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_float16_keeps_what_it_rounds_off_as_residual():
    start = _model([0.0], np.float64)
    trained = _model([1 / 3], np.float64)
    payload, residual = encode_update(trained, start, "float16")
    sent = float(np.float16(1 / 3))  # 0.333251953125
    assert payload["w::float16"].tolist() == [sent]
    assert residual["w"].tolist() == [1 / 3 - sent]
    assert sent + residual["w"][0] == 1 / 3


def test_topk_sends_the_k_largest_magnitudes_ties_to_the_lower_index():
    start = _model([0, 0, 0, 0, 0, 0])
    trained = _model([0.5, -5, 3, 0.25, -3, 4])
    payload, residual = encode_update(trained, start, "topk", k_fraction=0.5)
    # k = 3: -5 (index 1), 4 (index 5), then |3| == |-3|: index 2 before index 4
    assert payload["w::topk.index"].dtype == np.int32
    assert payload["w::topk.index"].tolist() == [1, 2, 5]
    assert payload["w::topk.value"].dtype == np.float32
    assert payload["w::topk.value"].tolist() == [-5, 3, 4]
    assert residual["w"].tolist() == [0.5, 0, 0, 0.25, -3, 0]
    assert decode_update(payload, start)["w"].tolist() == [0, -5, 3, 0, 0, 4]


def test_topk_count_is_the_ceiling_at_least_one():
    assert topk_count(30, 0.1) == 3  # not 4: 0.1 * 30 is 3.0000000000000004
    assert topk_count(31, 0.1) == 4
    assert topk_count(5, 0.01) == 1
    assert topk_count(5, 1.0) == 5
    assert topk_count(0, 0.5) == 0


def test_error_feedback_loses_nothing_over_rounds():
    """What was sent over the rounds plus the last residual equals the true deltas' sum."""
    start = _model([0] * 6)
    deltas = [
        [0.5, -5, 3, 0.25, -3, 4],
        [1, 1, -0.5, 2, 0.125, -1],
        [-0.75, 0, 0, 8, 0.5, 0.25],
    ]
    residual = None
    sent_sum = np.zeros(6)
    for d in deltas:
        payload, residual = encode_update(_model(d), start, "topk", residual, k_fraction=0.5)
        sent_sum += decode_update(payload, start)["w"].astype(np.float64)
    # round 2, by hand: corrected = [1.5, 1, -0.5, 2.25, -2.875, -1]; sent 2.25, -2.875, 1.5
    assert np.array_equal(sent_sum + residual["w"], np.sum(deltas, axis=0))


def test_int8_error_feedback_adds_the_residual_to_the_next_update():
    start = _model([0, 0, 0, 0])
    _, residual = encode_update(_model([254, -127, 2.5, 0.5]), start, "int8")
    # residual [0, 1, 0.5, 0.5] (above), added to the next delta [127, 0, 0, 0]
    payload, residual2 = encode_update(_model([127, 0, 0, 0]), start, "int8", residual)
    # corrected = [127, 1, 0.5, 0.5]: scale 1, q = [127, 1, 0, 0] (0.5 -> 0: half to even)
    assert payload["w::int8"].tolist() == [127, 1, 0, 0]
    assert residual2["w"].tolist() == [0.0, 0.0, 0.5, 0.5]


def test_integer_buffers_travel_as_they_are():
    start = {"w": np.zeros(3, np.float32), "steps": np.array([4], np.int64)}
    trained = {"w": np.array([1, 2, 3], np.float32), "steps": np.array([9], np.int64)}
    for method in ("float16", "int8", "topk"):
        payload, residual = encode_update(trained, start, method, k_fraction=1.0)
        assert payload["steps::raw"].tolist() == [9] and payload["steps::raw"].dtype == np.int64
        assert set(residual) == {"w"}
        out = decode_update(payload, start)
        assert list(out) == ["w", "steps"]
        assert out["steps"].tolist() == [9] and out["steps"].dtype == np.int64
        assert out["w"].dtype == np.float32


def test_a_residual_of_another_shape_is_ignored():
    start = _model([0, 0])
    payload, _ = encode_update(_model([1, 2]), start, "float16", {"w": np.ones(5)})
    assert payload["w::float16"].tolist() == [1, 2]


def test_bytes_shrink_by_the_expected_factors():
    rng = np.random.default_rng(0)
    start = {"w": np.zeros((100, 10), np.float32)}
    trained = {"w": rng.standard_normal((100, 10)).astype(np.float32)}
    raw = payload_bytes(trained)
    assert raw == 4000
    marker = {m: len(m) for m in ("float16", "int8", "topk")}
    assert payload_bytes(encode_update(trained, start, "float16")[0]) == 2000 + marker["float16"]
    assert payload_bytes(encode_update(trained, start, "int8")[0]) == 1000 + 4 + marker["int8"]
    topk = encode_update(trained, start, "topk", k_fraction=0.1)[0]
    assert payload_bytes(topk) == 100 * (4 + 4) + marker["topk"]


def test_max_norm_bounds_what_is_decoded():
    """DP-FedAvg: the decoded delta never exceeds the clip, even where int8 rounds up."""
    start = _model([0] * 5)
    trained = _model([3.0, 0.51, 0.51, 0.51, 0.51])
    for method in ("float16", "int8", "topk"):
        payload, residual = encode_update(trained, start, method, k_fraction=0.4, max_norm=1.0)
        delta = decode_update(payload, start)["w"].astype(np.float64)
        assert np.linalg.norm(delta) <= 1.0, method


def test_encoding_is_deterministic():
    rng = np.random.default_rng(1)
    start = {"w": rng.standard_normal(50).astype(np.float32)}
    trained = {"w": np.round(rng.standard_normal(50), 1).astype(np.float32)}  # many ties
    for method in ("float16", "int8", "topk"):
        a, ra = encode_update(trained, start, method, k_fraction=0.2)
        b, rb = encode_update(trained, start, method, k_fraction=0.2)
        assert all(np.array_equal(a[k], b[k]) for k in a) and list(a) == list(b)
        assert np.array_equal(ra["w"], rb["w"])


def test_encoding_refuses_unknown_methods_and_non_finite_updates():
    start = _model([0, 0])
    with pytest.raises(ValueError, match="unknown compression method"):
        encode_update(start, start, "zip")
    with pytest.raises(ValueError, match="NaN or infinity"):
        encode_update(_model([np.nan, 0]), start, "topk")
    with pytest.raises(ValueError, match="k_fraction"):
        encode_update(start, start, "topk", k_fraction=0)


def _topk_payload():
    start = _model([0, 0, 0, 0])
    payload, _ = encode_update(_model([1, 2, 3, 4]), start, "topk", k_fraction=0.5)
    return start, dict(payload)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.update({"w::topk.index": np.array([2, 4], np.int32)}), "out of range"),
        (lambda p: p.update({"w::topk.index": np.array([-1, 3], np.int32)}), "out of range"),
        (lambda p: p.update({"w::topk.index": np.array([3, 3], np.int32)}), "ascending"),
        (lambda p: p.update({"w::topk.index": np.array([2, 3], np.float32)}), "int32"),
        (lambda p: p.update({"w::topk.value": np.array([1], np.float32)}), "one value per"),
        (lambda p: p.pop("w::topk.value"), "lacks"),
        (lambda p: p.update({"v::topk.value": np.array([1], np.float32)}), "unexpected keys"),
        (lambda p: p.update({MARKER: np.frombuffer(b"zip", np.uint8).copy()}), "unknown"),
    ],
    ids=[
        "index-past-end",
        "negative-index",
        "repeated",
        "float-index",
        "short",
        "missing",
        "extra",
        "unknown-method",
    ],
)
def test_a_corrupt_topk_payload_is_refused(corrupt, message):
    start, payload = _topk_payload()
    corrupt(payload)
    with pytest.raises(InvalidWeights, match=message):
        decode_update(payload, start)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("w::int8", np.array([1, 2, 3], np.int8), "expected int8"),
        ("w::int8", np.array([1, 2, 3, -128], np.int8), "-128"),
        ("w::scale", np.array([np.nan], np.float32), "finite"),
        ("w::scale", np.array([-1.0], np.float32), "finite"),
        ("w::scale", np.array([1.0, 2.0], np.float32), r"\(1,\)"),
    ],
)
def test_a_corrupt_int8_payload_is_refused(key, value, message):
    start = _model([0, 0, 0, 0])
    payload, _ = encode_update(_model([1, 2, 3, 4]), start, "int8")
    payload[key] = value
    with pytest.raises(InvalidWeights, match=message):
        decode_update(payload, start)


def test_the_orchestrator_refuses_a_method_the_round_did_not_ask_for():
    start = _model([0, 0])
    trained = _model([1, 2])
    payload, _ = encode_update(trained, start, "int8")
    with pytest.raises(
        InvalidWeights, match="compressed with 'int8' but the round asks for 'topk'"
    ):
        receive_update(payload, start, "topk")
    with pytest.raises(InvalidWeights, match="compressed with 'none' but the round asks for"):
        receive_update(trained, start, "float16")
    with pytest.raises(
        InvalidWeights, match="compressed with 'int8' but the round asks for 'none'"
    ):
        receive_update(payload, start, "none")
    assert receive_update(trained, start, "none")["w"].tolist() == [1, 2]
    assert receive_update(payload, start, "int8")["w"].dtype == np.float32
