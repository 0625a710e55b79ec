"""Tests for twin_core.aggregation: FedAvg as a streaming, float64-accumulated weighted mean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from twin_core.aggregation import WeightedMean, fedavg
from twin_core.errors import InvalidWeights


def _f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# ---- hand-computed values ---------------------------------------------------------------------
def test_two_sites_weights_one_and_three_hand_computed():
    site_a = {"w": _f32([[1.0, 2.0], [3.0, 4.0]]), "b": _f32([0.5, -1.0])}
    site_b = {"w": _f32([[5.0, 6.0], [7.0, 8.0]]), "b": _f32([1.5, 3.0])}
    out = fedavg([(site_a, 1), (site_b, 3)])
    # w = (1*a + 3*b) / 4 ; b = (0.5 + 4.5)/4, (-1 + 9)/4
    np.testing.assert_array_equal(out["w"], _f32([[4.0, 5.0], [6.0, 7.0]]))
    np.testing.assert_array_equal(out["b"], _f32([1.25, 2.0]))
    assert list(out) == ["w", "b"]
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float32


def test_docstring_example():
    out = fedavg([({"w": np.array([1.0])}, 1), ({"w": np.array([4.0])}, 2)])
    np.testing.assert_array_equal(out["w"], np.array([3.0]))
    assert out["w"].dtype == np.float64


def test_three_sites_fractional_weights():
    updates = [
        ({"x": _f32([0.0, 10.0])}, 0.5),
        ({"x": _f32([2.0, 20.0])}, 1.5),
        ({"x": _f32([4.0, -10.0])}, 2.0),
    ]
    # x0 = (0 + 3 + 8) / 4 = 2.75 ; x1 = (5 + 30 - 20) / 4 = 3.75
    np.testing.assert_array_equal(fedavg(updates)["x"], _f32([2.75, 3.75]))


def test_weighted_mean_streaming_matches_fedavg_and_counts():
    a, b = {"w": _f32([1.0, 2.0])}, {"w": _f32([3.0, 6.0])}
    mean = WeightedMean()
    assert mean.count == 0
    mean.add(a, 2)
    mean.add(b, 2)
    assert mean.count == 2
    np.testing.assert_array_equal(mean.result()["w"], _f32([2.0, 4.0]))
    np.testing.assert_array_equal(mean.result()["w"], fedavg([(a, 2), (b, 2)])["w"])


def test_output_is_float32_but_accumulated_in_float64():
    # In float32, 2**24 + 1 + 1 rounds back to 2**24 and the mean would be 5592405.5;
    # accumulated in float64 the sum is exact and (2**24 + 2) / 3 = 5592406 exactly.
    updates = [({"w": _f32([16777216.0])}, 1), ({"w": _f32([1.0])}, 1), ({"w": _f32([1.0])}, 1)]
    out = fedavg(updates)["w"]
    assert out.dtype == np.float32
    assert out[0] == np.float32(5592406.0)
    naive = (np.float32(16777216.0) + np.float32(1.0) + np.float32(1.0)) / np.float32(3.0)
    assert naive != out[0]  # the float32 accumulation would have given a different answer


def test_mixed_dtypes_keep_their_own_dtype():
    a = {
        "f16": np.array([1.0, 3.0], np.float16),
        "f64": np.array([0.1]),
        "i": np.array([1], np.int32),
    }
    b = {
        "f16": np.array([3.0, 5.0], np.float16),
        "f64": np.array([0.3]),
        "i": np.array([3], np.int32),
    }
    out = fedavg([(a, 1), (b, 1)])
    assert out["f16"].dtype == np.float16 and out["f64"].dtype == np.float64
    assert out["i"].dtype == np.int32
    np.testing.assert_array_equal(out["f16"], np.array([2.0, 4.0], np.float16))
    assert out["f64"][0] == pytest.approx(0.2, rel=1e-15)
    assert out["i"][0] == 2


def test_integer_tensors_take_rounded_weighted_mean():
    a = {"num_batches_tracked": np.array(10, dtype=np.int64), "c": np.array([1, 2], np.int64)}
    b = {"num_batches_tracked": np.array(21, dtype=np.int64), "c": np.array([2, 7], np.int64)}
    out = fedavg([(a, 1), (b, 3)])
    # (10 + 63) / 4 = 18.25 -> 18 ; (1 + 6)/4 = 1.75 -> 2 ; (2 + 21)/4 = 5.75 -> 6
    assert out["num_batches_tracked"].dtype == np.int64
    assert out["num_batches_tracked"].shape == ()
    assert int(out["num_batches_tracked"]) == 18
    np.testing.assert_array_equal(out["c"], np.array([2, 6], np.int64))
    assert out["c"].dtype == np.int64


def test_unsigned_integer_tensor_rounded():
    out = fedavg([({"u": np.array([200], np.uint8)}, 1), ({"u": np.array([255], np.uint8)}, 2)])
    # (200 + 510) / 3 = 236.67 -> 237, no overflow because the sum is in float64
    assert out["u"].dtype == np.uint8
    assert int(out["u"][0]) == 237


def test_single_update_returns_it_unchanged():
    w = {"a": _f32([[0.1, -0.2], [1e-7, 3e5]]), "n": np.array([3], np.int64)}
    out = fedavg([(w, 17)])
    for name in w:
        np.testing.assert_array_equal(out[name], w[name])
        assert out[name].dtype == w[name].dtype


def test_result_does_not_alias_inputs():
    w = {"a": _f32([1.0, 2.0])}
    out = fedavg([(w, 1)])
    out["a"][0] = 99.0
    assert w["a"][0] == 1.0


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_weight", [0, 0.0, -1, -0.5, float("nan")])
def test_non_positive_or_nan_weight_rejected(bad_weight):
    with pytest.raises(InvalidWeights, match="positive"):
        fedavg([({"w": _f32([1.0])}, bad_weight)])


@pytest.mark.parametrize("bad_weight", [0, -2.0, float("nan")])
def test_non_positive_weight_rejected_after_a_valid_update(bad_weight):
    mean = WeightedMean()
    mean.add({"w": _f32([1.0])}, 1)
    with pytest.raises(InvalidWeights, match="positive"):
        mean.add({"w": _f32([2.0])}, bad_weight)


@pytest.mark.parametrize(
    "second, match",
    [
        ({"w": _f32([1.0, 2.0]), "c": _f32([0.0])}, "names differ"),  # different name
        ({"w": _f32([1.0, 2.0])}, "names differ"),  # missing tensor
        ({"w": _f32([1.0, 2.0]), "b": _f32([0.0]), "x": _f32([0.0])}, "names differ"),  # extra
        ({"b": _f32([0.0]), "w": _f32([1.0, 2.0])}, "names differ"),  # same names, other order
        ({"w": _f32([1.0, 2.0, 3.0]), "b": _f32([0.0])}, "'w' shape"),
        ({"w": _f32([[1.0, 2.0]]), "b": _f32([0.0])}, "'w' shape"),
        ({"w": _f32([1.0, 2.0]), "b": _f32(0.0)}, "'b' shape"),
    ],
    ids=["renamed", "missing", "extra", "reordered", "longer", "extra-dim", "scalar"],
)
def test_mismatched_updates_rejected(second, match):
    first = {"w": _f32([1.0, 2.0]), "b": _f32([0.0])}
    with pytest.raises(InvalidWeights, match=match):
        fedavg([(first, 1), (second, 1)])


def test_no_updates_rejected():
    with pytest.raises(InvalidWeights, match="no updates"):
        fedavg([])
    with pytest.raises(InvalidWeights, match="no updates"):
        WeightedMean().result()


def test_no_updates_after_only_rejected_one():
    mean = WeightedMean()
    with pytest.raises(InvalidWeights):
        mean.add({"w": _f32([1.0])}, 0)
    with pytest.raises(InvalidWeights, match="no updates"):
        mean.result()


# ---- properties -------------------------------------------------------------------------------
_SHAPE = (3, 2)
_values = hnp.arrays(
    np.float32,
    _SHAPE,
    elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False),
)
_weights = st.floats(1e-2, 1e4, allow_nan=False, allow_infinity=False)
_site_updates = st.lists(st.tuples(_values, _values, _weights), min_size=1, max_size=6)


def _as_updates(items) -> list[tuple[dict, float]]:
    return [({"a": a, "b": b}, w) for a, b, w in items]


@settings(max_examples=60, deadline=None)
@given(items=_site_updates, data=st.data())
def test_invariant_to_site_order(items, data):
    updates = _as_updates(items)
    permuted = data.draw(st.permutations(updates))
    ref, got = fedavg(updates), fedavg(permuted)
    scale = max(float(np.abs(np.stack([u[n] for u, _ in updates])).max()) for n in ("a", "b"))
    for name in ("a", "b"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-6 * max(scale, 1e-30))


@settings(max_examples=40, deadline=None)
@given(items=_site_updates, data=st.data())
def test_exact_when_fed_in_sorted_site_order(items, data):
    by_site = {f"site-{i:02d}": u for i, u in enumerate(_as_updates(items))}
    shuffled = data.draw(st.permutations(list(by_site.items())))
    first = fedavg(by_site[s] for s in sorted(by_site))
    second = fedavg(u for _, u in sorted(shuffled, key=lambda kv: kv[0]))
    for name in ("a", "b"):
        assert first[name].tobytes() == second[name].tobytes()


@settings(max_examples=60, deadline=None)
@given(
    value=_values,
    weights=st.lists(_weights, min_size=1, max_size=6),
)
def test_identical_updates_give_that_update_exactly(value, weights):
    out = fedavg(({"a": value}, w) for w in weights)
    assert out["a"].dtype == np.float32
    np.testing.assert_array_equal(out["a"], value)


@settings(max_examples=60, deadline=None)
@given(
    value=hnp.arrays(np.int64, (4,), elements=st.integers(-(10**9), 10**9)),
    weights=st.lists(_weights, min_size=1, max_size=5),
)
def test_identical_integer_updates_give_that_update_exactly(value, weights):
    out = fedavg(({"n": value}, w) for w in weights)
    assert out["n"].dtype == np.int64
    np.testing.assert_array_equal(out["n"], value)


@settings(max_examples=60, deadline=None)
@given(items=_site_updates)
def test_each_coordinate_between_min_and_max_of_inputs(items):
    updates = _as_updates(items)
    out = fedavg(updates)
    for name in ("a", "b"):
        stacked = np.stack([u[name] for u, _ in updates])
        assert (out[name] >= stacked.min(axis=0)).all()
        assert (out[name] <= stacked.max(axis=0)).all()


# ---- the blocked fold -------------------------------------------------------------------------
def test_blocked_fold_gives_the_bits_of_the_one_line_expression():
    """Tensors longer than FOLD_BLOCK are folded block by block through a scratch buffer; the
    result must be bit-for-bit the unblocked `acc += float64(x) * w`, then `acc / total`."""
    from twin_core.aggregation import FOLD_BLOCK

    rng = np.random.default_rng(5)
    size = 2 * FOLD_BLOCK + 3
    shapes = {"big": (size,), "grid": (3, FOLD_BLOCK // 2 + 1), "count": (), "empty": (0, 2)}
    dtypes = {"big": np.float32, "grid": np.float16, "count": np.int64, "empty": np.float32}
    updates = []
    for w in (3, 0.37, np.float32(1.5), 1e4):
        update = {n: (rng.standard_normal(shapes[n]) * 100).astype(dtypes[n]) for n in shapes}
        update["grid"] = np.asfortranarray(update["grid"])  # not C-contiguous
        updates.append((update, w))
    mean = WeightedMean()
    for update, w in updates:
        mean.add(update, w)
    out = mean.result()
    total = sum(float(w) for _, w in updates)
    for name, dtype in dtypes.items():
        acc = np.zeros(shapes[name])
        for update, w in updates:
            acc += np.asarray(update[name], dtype=np.float64) * w
        expected = acc / total
        expected = np.rint(expected).astype(dtype) if name == "count" else expected.astype(dtype)
        assert out[name].dtype == expected.dtype and out[name].shape == expected.shape
        assert out[name].tobytes() == expected.tobytes(), name


# ---- the grouped, threaded fold: the same bits as the one-line expression ---------------------
def _reference(updates) -> dict[str, np.ndarray]:
    """The fold as it was first written, one update at a time, then the same `result()`."""
    sums: dict[str, np.ndarray] = {}
    total = 0.0
    for weights, weight in updates:
        for name, array in weights.items():
            product = np.asarray(array, np.float64) * weight
            sums[name] = sums[name] + product if name in sums else 0.0 + product
        total += float(weight)
    out = {}
    for name, acc in sums.items():
        dtype = updates[0][0][name].dtype
        mean = acc / total
        if dtype.kind in "iub":
            mean = np.rint(mean)
        out[name] = mean.astype(dtype)
    return out


def _random_updates(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    updates = []
    for _ in range(count):
        weights = {
            "big": rng.standard_normal(70_001, dtype=np.float32) * 1e3,
            "matrix": rng.standard_normal((33, 17)).astype(np.float16),
            "f64": rng.standard_normal(5000),
            "count": rng.integers(0, 1000, size=(3,), dtype=np.int64),
            "scalar": np.float32(rng.standard_normal()).reshape(()),
            "empty": np.zeros((0, 4), np.float32),
        }
        updates.append((weights, float(rng.integers(1, 5000)) * rng.uniform(0.1, 1.0)))
    return updates


@pytest.mark.parametrize(("group", "threads"), [(1, 1), (3, 1), (16, 1), (1, 2), (4, 3), (16, 2)])
def test_grouped_threaded_fold_is_bit_identical_to_the_one_line_expression(
    group, threads, monkeypatch
):
    import twin_core.aggregation as module

    # small blocks and splits, so groups, blocks and thread ranges all have seams
    monkeypatch.setattr(module, "GROUP_BLOCK", 4096)
    updates = _random_updates(11)
    mean = WeightedMean(group=group, threads=threads)
    for weights, weight in updates:
        mean.add(weights, weight)
    got, want = mean.result(), _reference(updates)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].tobytes() == want[name].tobytes(), name


def test_default_fold_is_bit_identical_at_real_sizes():
    rng = np.random.default_rng(5)
    updates = [
        ({"w": rng.standard_normal(600_000, dtype=np.float32)}, float(100 + 7 * i))
        for i in range(20)
    ]
    assert fedavg(updates)["w"].tobytes() == _reference(updates)["w"].tobytes()


def test_pending_updates_are_folded_by_result_and_counted():
    mean = WeightedMean(group=8)
    mean.add({"w": _f32([1.0])}, 1)
    mean.add({"w": _f32([3.0])}, 1)
    assert mean.count == 2
    np.testing.assert_array_equal(mean.result()["w"], _f32([2.0]))


def test_shape_mismatch_rejected_before_anything_is_folded():
    mean = WeightedMean()
    mean.add({"w": _f32([1.0, 2.0]), "b": _f32([1.0])}, 1)
    with pytest.raises(InvalidWeights, match="shape"):
        mean.add({"w": _f32([1.0, 2.0]), "b": _f32([1.0, 2.0])}, 1)
    assert mean.count == 1
    np.testing.assert_array_equal(mean.result()["w"], _f32([1.0, 2.0]))


# ---- updates whose file pages are checked as they are folded ----------------------------------
def _saved(tmp_path, updates):
    from twin_core.weights import save_weights

    paths = []
    for i, (weights, _) in enumerate(updates):
        paths.append(tmp_path / f"u{i}.twt")
        save_weights(paths[-1], weights)
    return paths


def test_checked_as_read_gives_the_same_bits_as_checked_first(tmp_path):
    from twin_core.weights import load_weights

    updates = _random_updates(5, seed=2)
    paths = _saved(tmp_path, updates)
    as_read = fedavg(
        (load_weights(p, check_as_read=True).weights, w)
        for p, (_, w) in zip(paths, updates, strict=True)
    )
    first = fedavg((load_weights(p).weights, w) for p, (_, w) in zip(paths, updates, strict=True))
    want = _reference(updates)
    for name in want:
        assert as_read[name].tobytes() == first[name].tobytes() == want[name].tobytes(), name


@pytest.mark.parametrize("threads", [1, 2])
def test_corrupt_update_file_is_refused_before_its_damaged_page_is_folded(tmp_path, threads):
    from twin_core.weights import PAGE_BYTES, load_weights

    updates = _random_updates(4, seed=3)
    paths = _saved(tmp_path, updates)
    data = bytearray(paths[2].read_bytes())
    body = len(data) - sum(a.nbytes for a in updates[2][0].values())
    damaged_at = body + 5 * PAGE_BYTES + 100  # inside "big"
    data[damaged_at] ^= 0x04
    paths[2].write_bytes(bytes(data))

    mean = WeightedMean(threads=threads)
    with pytest.raises(InvalidWeights, match=f"{paths[2].name} fails its checksum.*page 5"):
        for path, (_, weight) in zip(paths, updates, strict=True):
            mean.add(load_weights(path, check_as_read=True).weights, weight)
        mean.result()
    # the block holding the damaged page has the first two updates in it and nothing of the third
    element = (damaged_at - body) // 4
    (u0, w0), (u1, w1) = updates[0], updates[1]
    expected = 0.0 + np.float64(u0["big"][element]) * w0 + np.float64(u1["big"][element]) * w1
    assert mean._sums["big"][element] == expected
