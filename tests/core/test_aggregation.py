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
