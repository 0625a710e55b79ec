"""Tests for twin_core.weights: manifests, byte layout, weight files and update checks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from twin_core.errors import InvalidWeights
from twin_core.weights import (
    PAGE_BYTES,
    Manifest,
    PageCheckedWeights,
    TensorSpec,
    VerifiedWeights,
    check_compatible,
    check_manifest,
    check_update,
    delta_norm,
    known_manifest,
    load_weights,
    manifest_of,
    non_finite_tensors,
    page_checksums,
    save_weights,
    specs_of,
    weights_from_buffer,
    weights_to_bytes,
)


def _model() -> dict[str, np.ndarray]:
    return {
        "layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "layer.bias": np.array([0.5, -0.25], dtype=np.float32),
        "counter": np.array(12, dtype=np.int64),
    }


def _same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


# ---- manifest -----------------------------------------------------------------------------------
def test_manifest_layout_and_sha256():
    w = _model()
    m = manifest_of(w)
    assert m.tensors == (
        TensorSpec("layer.weight", "float32", (2, 3)),
        TensorSpec("layer.bias", "float32", (2,)),
        TensorSpec("counter", "int64", ()),
    )
    assert m.total_bytes == 6 * 4 + 2 * 4 + 8
    expected = hashlib.sha256(b"".join(a.tobytes() for a in w.values())).hexdigest()
    assert m.sha256 == expected
    assert specs_of(w) == m.tensors


def test_manifest_stable_across_copies_and_layouts():
    w = _model()
    copy = {k: v.copy() for k, v in w.items()}
    # same values held Fortran-ordered and big-endian: the byte layout is canonical
    other = {
        "layer.weight": np.asfortranarray(w["layer.weight"]),
        "layer.bias": w["layer.bias"].astype(">f4"),
        "counter": w["counter"].astype(">i8"),
    }
    assert manifest_of(w) == manifest_of(copy) == manifest_of(other)
    assert weights_to_bytes(other) == weights_to_bytes(w)


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w["layer.bias"].__setitem__(0, np.float32(0.5000001)),
        lambda w: w["counter"].__setitem__((), 13),
    ],
    ids=["float-ulp", "int"],
)
def test_manifest_sha_changes_with_any_value(change):
    w = _model()
    before = manifest_of(w).sha256
    change(w)
    assert manifest_of(w).sha256 != before


def test_manifest_sha_depends_on_tensor_order():
    w = _model()
    reordered = {k: w[k] for k in reversed(list(w))}
    assert manifest_of(reordered).sha256 != manifest_of(w).sha256


def test_manifest_json_round_trip():
    m = manifest_of(_model())
    doc = json.loads(json.dumps(m.as_json()))
    assert Manifest.from_json(doc) == m


def test_tensor_spec_nbytes():
    assert TensorSpec("x", "float16", (3, 5)).nbytes == 30
    assert TensorSpec("x", "int64", ()).nbytes == 8
    assert TensorSpec("x", "float32", (0, 4)).nbytes == 0


# ---- byte round trip ------------------------------------------------------------------------
_ROUND_TRIP_CASES = {
    "float32": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4),
    "float64": np.array([np.pi, -0.0, 1e-300, 1e300]),
    "float16": np.array([0.1, -65504.0, 6e-8, 1.0], dtype=np.float16),
    "int64": np.array([-(2**63), 2**63 - 1, 0, -1], dtype=np.int64),
    "int32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
    "int16": np.array([-32768, 32767], dtype=np.int16),
    "int8": np.array([-128, 127, 0], dtype=np.int8),
    "uint8": np.array([0, 255, 7], dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "scalar-0d": np.array(2.5, dtype=np.float64),
    "int-0d": np.array(-7, dtype=np.int64),
    "empty-1d": np.zeros((0,), dtype=np.float32),
    "nan-inf": np.array([np.nan, np.inf, -np.inf], dtype=np.float32),
    "non-contiguous": np.arange(12, dtype=np.float32).reshape(3, 4).T,
    "big-endian": np.arange(4, dtype=">f8"),
}


@pytest.mark.parametrize("name", list(_ROUND_TRIP_CASES))
def test_bytes_round_trip_bit_exact(name):
    array = _ROUND_TRIP_CASES[name]
    w = {"t": array}
    manifest = manifest_of(w)
    raw = weights_to_bytes(w)
    assert len(raw) == manifest.total_bytes == array.nbytes
    back = weights_from_buffer(manifest, raw)
    assert back["t"].shape == array.shape
    assert back["t"].dtype == array.dtype.newbyteorder("=")
    le = array.astype(array.dtype.newbyteorder("<"))
    assert back["t"].tobytes() == np.ascontiguousarray(le).tobytes()
    np.testing.assert_array_equal(back["t"], array)


def test_bytes_round_trip_many_tensors_at_once():
    w = dict(_ROUND_TRIP_CASES)
    manifest = manifest_of(w)
    back = weights_from_buffer(manifest, weights_to_bytes(w))
    assert list(back) == list(w)
    for k in w:
        np.testing.assert_array_equal(back[k], w[k])


def test_empty_weights_round_trip():
    m = manifest_of({})
    assert m.total_bytes == 0 and m.tensors == ()
    assert m.sha256 == hashlib.sha256(b"").hexdigest()
    assert weights_from_buffer(m, b"") == {}


def test_empty_multidimensional_tensor_round_trip():
    w = {"e": np.zeros((0, 3), dtype=np.float32)}
    manifest = manifest_of(w)
    assert manifest.total_bytes == 0
    back = weights_from_buffer(manifest, weights_to_bytes(w))
    assert back["e"].shape == (0, 3)


@pytest.mark.parametrize("delta", [-1, 1])
def test_buffer_of_wrong_length_rejected(delta):
    w = _model()
    manifest, raw = manifest_of(w), weights_to_bytes(w)
    buffer = raw[:delta] if delta < 0 else raw + b"\x00"
    with pytest.raises(InvalidWeights, match=f"expected {manifest.total_bytes} bytes"):
        weights_from_buffer(manifest, buffer)


# ---- files ------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    w = dict(_model(), half=np.array([1.5, -2.0], np.float16), flag=np.array([True]))
    path = tmp_path / "sub" / "model.twt"
    manifest = save_weights(path, w, {"round": "r1", "sites": ["a", "b"]})
    assert manifest == manifest_of(w)
    assert not (tmp_path / "sub" / "model.twt.tmp").exists()
    stored = load_weights(path)
    assert stored.manifest == manifest
    assert stored.meta == {"round": "r1", "sites": ["a", "b"]}
    _same_bytes(stored.weights, w)


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "m.twt"
    save_weights(path, {"a": np.zeros(3, np.float32)})
    save_weights(path, {"a": np.ones(3, np.float32)})
    stored = load_weights(path)
    np.testing.assert_array_equal(stored.weights["a"], np.ones(3, np.float32))
    assert stored.meta == {}


def test_flipped_body_byte_fails_checksum(tmp_path):
    w = _model()
    path = tmp_path / "m.twt"
    manifest = save_weights(path, w)
    data = bytearray(path.read_bytes())
    body_start = len(data) - manifest.total_bytes
    data[body_start + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidWeights, match="checksum"):
        load_weights(path)
    # without verification the (corrupt) bytes are still loaded, proving it was the body
    assert (
        load_weights(path, verify=False).weights["layer.weight"].tobytes()
        != w["layer.weight"].tobytes()
    )


def test_truncated_body_fails_checksum(tmp_path):
    path = tmp_path / "m.twt"
    save_weights(path, _model())
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InvalidWeights, match="checksum"):
        load_weights(path)
    with pytest.raises(InvalidWeights, match="bytes"):
        load_weights(path, verify=False)


@pytest.mark.parametrize(
    "content",
    [b"hello, this is a CSV file\n1,2,3\n", b"TWINWTS", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64],
    ids=["text", "short-magic", "png"],
)
def test_non_weights_file_rejected(tmp_path, content):
    path = tmp_path / "not-weights.bin"
    path.write_bytes(content)
    with pytest.raises(InvalidWeights, match="not a Twin Pipelines weights file"):
        load_weights(path)


def test_empty_file_rejected_as_invalid_weights(tmp_path):
    path = tmp_path / "empty.twt"
    path.write_bytes(b"")
    with pytest.raises(InvalidWeights):
        load_weights(path)


def test_garbled_header_rejected_as_invalid_weights(tmp_path):
    path = tmp_path / "m.twt"
    save_weights(path, _model())
    path.write_bytes(path.read_bytes()[:20])  # magic + length + a few header bytes
    with pytest.raises(InvalidWeights):
        load_weights(path)


# ---- update checks ----------------------------------------------------------------------------
def _update(**changes) -> dict[str, np.ndarray]:
    w = {k: v.copy() for k, v in _model().items()}
    w.update(changes)
    return w


def test_check_update_accepts_valid_update_and_returns_norm():
    ref = _model()
    upd = _update(**{"layer.bias": ref["layer.bias"] + np.float32(3.0)})
    upd["layer.weight"] = ref["layer.weight"].copy()
    upd["layer.weight"][0, 0] += np.float32(4.0)
    # delta: bias +3, +3 ; weight +4 (float32 arithmetic) -> norm sqrt(9 + 9 + 16) = sqrt(34)
    norm = check_update(upd, ref, max_delta_norm=10.0)
    assert norm == pytest.approx(np.sqrt(34.0), rel=1e-6)
    assert delta_norm(upd, ref) == norm


def test_delta_norm_ignores_integer_tensors():
    ref = _model()
    upd = _update(counter=np.array(10**6, np.int64))
    assert delta_norm(upd, ref) == 0.0
    assert check_update(upd, ref, max_delta_norm=1e-9) == 0.0


def test_checks_of_a_large_update_work_a_block_at_a_time():
    """Several updates are checked at once as they arrive: the checks' temporaries must not
    grow with the model (tensor-sized float64 copies made the orchestrator peak at 14 models)."""
    import tracemalloc

    from twin_core.weights import CHECK_BLOCK, non_finite_tensors

    rng = np.random.default_rng(3)
    size = 40 * CHECK_BLOCK + 123  # 10 MB of float32: many blocks and a partial one
    ref = {"w": rng.standard_normal(size, dtype=np.float32), "n": np.array([3], np.int64)}
    upd = {"w": ref["w"] + np.float32(0.25), "n": np.array([4], np.int64)}
    expected = np.sqrt(np.sum((upd["w"].astype(np.float64) - ref["w"].astype(np.float64)) ** 2))
    tracemalloc.start()
    try:
        norm = delta_norm(upd, ref)
        bad = non_finite_tensors(upd)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert norm == pytest.approx(expected, rel=1e-12)
    assert bad == []
    assert peak < 2 * CHECK_BLOCK * 8 + 100_000  # a block's scratch, not the 4 MB tensor
    upd["w"][-1] = np.nan  # in the last, partial block
    assert non_finite_tensors(upd) == ["w"]


def test_check_update_identical_is_zero_norm():
    assert check_update(_model(), _model(), max_delta_norm=0.0) == 0.0


def _with_value(name: str, index, value):
    def make():
        w = _update()
        w[name][index] = value
        return w

    return make


@pytest.mark.parametrize(
    "make, pattern",
    [
        (_with_value("layer.weight", (0, 1), np.nan), r"non-finite.*'layer\.weight'"),
        (_with_value("layer.bias", 1, np.inf), r"non-finite.*'layer\.bias'"),
        (_with_value("layer.bias", 0, -np.inf), r"non-finite.*'layer\.bias'"),
        (
            lambda: _update(**{"layer.weight": np.zeros((3, 2), np.float32)}),
            r"'layer\.weight' has shape \(3, 2\), expected \(2, 3\)",
        ),
        (
            lambda: _update(**{"layer.bias": np.zeros((2,), np.float64)}),
            r"'layer\.bias' has dtype float64, expected float32",
        ),
        (
            lambda: _update(counter=np.array(12, np.int32)),
            r"'counter' has dtype int32, expected int64",
        ),
        (
            lambda: {k: v for k, v in _update().items() if k != "layer.bias"},
            r"missing \['layer\.bias'\]",
        ),
        (
            lambda: _update(extra=np.zeros(1, np.float32)),
            r"unexpected \['extra'\]",
        ),
        (
            lambda: {
                ("layer.renamed" if k == "layer.bias" else k): v for k, v in _update().items()
            },
            r"missing \['layer\.bias'\], unexpected \['layer\.renamed'\]",
        ),
        (
            lambda: {k: _update()[k] for k in reversed(list(_model()))},
            r"order differs",
        ),
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "shape",
        "dtype-float",
        "dtype-int",
        "missing",
        "extra",
        "renamed",
        "order",
    ],
)
def test_check_update_rejects(make, pattern):
    with pytest.raises(InvalidWeights, match=pattern):
        check_update(make(), _model(), max_delta_norm=1e6)


def test_check_update_rejects_too_large_delta_norm():
    ref = _model()
    upd = _update(**{"layer.bias": ref["layer.bias"] + np.float32(3.0)})
    upd["layer.weight"][0, 0] += np.float32(4.0)  # norm sqrt(34) ~ 5.831
    with pytest.raises(InvalidWeights, match=r"update norm 5\.831 exceeds the bound 5\.8"):
        check_update(upd, ref, max_delta_norm=5.8)
    assert check_update(upd, ref, max_delta_norm=5.84) == pytest.approx(np.sqrt(34.0), rel=1e-6)


def test_non_finite_tensors_lists_only_float_offenders():
    w = _update()
    w["layer.bias"][0] = np.nan
    assert non_finite_tensors(w) == ["layer.bias"]
    assert non_finite_tensors(_model()) == []


def test_check_compatible_accepts_equal_layout():
    check_compatible(_update(), _model())  # no exception


# ---- manifest checks --------------------------------------------------------------------------
def _manifest(*tensors: tuple[str, str, tuple[int, ...]], total: int | None = None) -> Manifest:
    specs = tuple(TensorSpec(*t) for t in tensors)
    if total is None:
        total = sum(s.nbytes for s in specs)
    return Manifest(specs, total, "0" * 64)


def test_check_manifest_accepts_plausible_layout():
    check_manifest(_manifest(("a", "float32", (2, 3)), ("b", "int64", ()), ("c", "bool", (0,))))
    check_manifest(manifest_of(_model()))


@pytest.mark.parametrize(
    "manifest, pattern",
    [
        (_manifest(("a", "float32", (2,)), ("a", "float32", (2,))), "duplicate tensor names"),
        (
            Manifest((TensorSpec("obj", "object", (1,)),), 8, "0" * 64),
            r"'obj' has unsupported dtype 'object'",
        ),
        (_manifest(("c", "complex64", (1,)), total=8), r"'c' has unsupported dtype 'complex64'"),
        (_manifest(("s", "<U4", (1,)), total=16), r"'s' has unsupported dtype '<U4'"),
        (
            Manifest((TensorSpec("neg", "float32", (-1, 4)),), 0, "0" * 64),
            r"'neg' has a negative dimension \(-1, 4\)",
        ),
        (
            Manifest((TensorSpec("neg2", "float32", (-2, -2)),), 16, "0" * 64),
            r"'neg2' has a negative dimension",
        ),
        (
            _manifest(("a", "float32", (2, 3)), total=23),
            "manifest says 23 bytes but its tensors need 24",
        ),
        (
            _manifest(("a", "float32", (2, 3)), total=25),
            "manifest says 25 bytes but its tensors need 24",
        ),
    ],
    ids=["duplicate", "object", "complex", "unicode", "negative", "two-negatives", "short", "long"],
)
def test_check_manifest_rejects(manifest, pattern):
    with pytest.raises(InvalidWeights, match=pattern):
        check_manifest(manifest)
    with pytest.raises(InvalidWeights, match=pattern):
        weights_from_buffer(manifest, b"\x00" * manifest.total_bytes)


# ---- page checksums at rest, known manifests, pages checked as read ----------------------------
def _big_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "a": rng.standard_normal(5000, dtype=np.float32),  # 20,000 bytes: pages 0-4
        "n": np.array(7, dtype=np.int64),
        "b": rng.standard_normal(3001).astype(np.float16),
    }


def _body_start(path, manifest: Manifest) -> int:
    return path.stat().st_size - manifest.total_bytes


def test_page_checksums_catch_every_single_bit_flip():
    body = bytearray(np.random.default_rng(0).integers(0, 256, 100, dtype=np.uint8).tobytes())
    reference = page_checksums(body)
    for byte in range(len(body)):
        for bit in range(8):
            body[byte] ^= 1 << bit
            assert not np.array_equal(page_checksums(body), reference), (byte, bit)
            body[byte] ^= 1 << bit


def test_page_checksums_are_word_sums_per_page():
    body = np.arange(PAGE_BYTES // 8 * 2 + 3, dtype="<u8").tobytes()[:-5]  # 2 pages and a bit
    sums = page_checksums(body)
    words = np.frombuffer(body[: 2 * PAGE_BYTES], "<u8").reshape(2, -1)
    tail = np.frombuffer(body[2 * PAGE_BYTES :] + b"\0" * 5, "<u8")
    assert sums.tolist() == [*words.sum(axis=1).tolist(), int(tail.sum())]


def test_saved_body_is_aligned_and_last(tmp_path):
    w = _big_model()
    path = tmp_path / "m.twt"
    manifest = save_weights(path, w, {"x": "y" * 123})
    assert _body_start(path, manifest) % 64 == 0
    assert path.read_bytes()[-manifest.total_bytes :] == weights_to_bytes(w)


def test_corrupt_page_in_file_is_named(tmp_path):
    w = _big_model()
    path = tmp_path / "m.twt"
    manifest = save_weights(path, w)
    data = bytearray(path.read_bytes())
    data[_body_start(path, manifest) + 3 * PAGE_BYTES + 10] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidWeights, match=f"1 damaged page.*byte {3 * PAGE_BYTES} of the body"):
        load_weights(path)


def test_zeroed_page_in_file_is_detected(tmp_path):
    path = tmp_path / "m.twt"
    manifest = save_weights(path, _big_model())
    data = bytearray(path.read_bytes())
    start = _body_start(path, manifest) + PAGE_BYTES
    data[start : start + PAGE_BYTES] = bytes(PAGE_BYTES)
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidWeights, match="checksum"):
        load_weights(path)


def test_corrupt_header_is_detected(tmp_path):
    path = tmp_path / "m.twt"
    save_weights(path, _model(), {"note": "abc"})
    data = path.read_bytes()
    assert data.count(b'"abc"') == 1
    path.write_bytes(data.replace(b'"abc"', b'"abd"'))  # still valid JSON
    with pytest.raises(InvalidWeights, match="header is corrupt"):
        load_weights(path)


def test_extended_file_is_detected(tmp_path):
    path = tmp_path / "m.twt"
    save_weights(path, _model())
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(InvalidWeights, match="checksum"):
        load_weights(path)


def test_first_format_files_still_read_and_checked_by_sha256(tmp_path):
    w = _model()
    manifest = manifest_of(w)
    header = json.dumps({"manifest": manifest.as_json(), "meta": {"v": 1}}).encode()
    path = tmp_path / "old.twt"
    path.write_bytes(b"TWINWTS1" + len(header).to_bytes(8, "little") + header + weights_to_bytes(w))
    stored = load_weights(path)
    assert stored.meta == {"v": 1} and stored.manifest == manifest
    _same_bytes(stored.weights, w)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidWeights, match="checksum"):
        load_weights(path)


def test_loaded_weights_carry_their_manifest_read_only(tmp_path):
    path = tmp_path / "m.twt"
    manifest = save_weights(path, _model())
    stored = load_weights(path)
    assert isinstance(stored.weights, VerifiedWeights)
    assert known_manifest(stored.weights) == manifest == manifest_of(stored.weights)
    assert not any(a.flags.writeable for a in stored.weights.values())
    assert known_manifest(dict(stored.weights)) is None  # a copy proves nothing
    assert known_manifest(load_weights(path, verify=False).weights) is None


def test_known_manifest_lost_when_an_array_is_replaced(tmp_path):
    path = tmp_path / "m.twt"
    save_weights(path, _model())
    weights = load_weights(path).weights
    weights["layer.bias"] = np.array([9.0, 9.0], np.float32)
    assert known_manifest(weights) is None
    assert known_manifest(_model()) is None


def test_save_reuses_a_known_manifest_and_hashes_anything_else(tmp_path, monkeypatch):
    import twin_core.weights as module

    path = tmp_path / "m.twt"
    manifest = save_weights(path, _model())
    stored = load_weights(path)

    def no_hashing(_weights):
        raise AssertionError("hashed again")

    monkeypatch.setattr(module, "manifest_of", no_hashing)
    assert save_weights(tmp_path / "again.twt", stored.weights) == manifest
    _same_bytes(load_weights(tmp_path / "again.twt").weights, _model())
    with pytest.raises(AssertionError, match="hashed again"):
        save_weights(tmp_path / "plain.twt", dict(stored.weights))


def test_check_as_read_checks_header_and_size_now_pages_later(tmp_path):
    w = _big_model()
    path = tmp_path / "m.twt"
    manifest = save_weights(path, w)
    stored = load_weights(path, check_as_read=True)
    assert isinstance(stored.weights, PageCheckedWeights)
    assert known_manifest(stored.weights) is None
    assert stored.weights.offsets == {"a": 0, "n": 20_000, "b": 20_008}
    stored.weights.checker.check(0, manifest.total_bytes)  # intact
    data = bytearray(path.read_bytes())
    data[_body_start(path, manifest) + 20_001] ^= 0x01  # in "n", page 4
    path.write_bytes(bytes(data))
    damaged = load_weights(path, check_as_read=True).weights  # the body is not read yet
    damaged.checker.check(0, 4 * PAGE_BYTES)  # pages 0-3 are intact
    with pytest.raises(InvalidWeights, match=f"{path.name} fails its checksum.*page 4"):
        damaged.checker.check(20_000, 20_008)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(InvalidWeights, match="checksum"):
        load_weights(path, check_as_read=True)
