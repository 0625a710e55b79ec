"""Tests for twin_core.robust: coordinate median, trimmed mean, (multi-)Krum and screening."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from twin_core.errors import InvalidWeights
from twin_core.robust import (
    coordinate_median,
    krum_scores,
    multi_krum,
    screen_updates,
    trimmed_mean,
)


def _f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _bits(weights) -> dict:
    return {name: (a.dtype.str, a.shape, a.tobytes()) for name, a in weights.items()}


def _assert_same(got, want) -> None:
    """Same names, order, dtypes, shapes and values (-0.0 equals 0.0: results use +0.0)."""
    assert list(got) == list(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        np.testing.assert_array_equal(got[name], a)


# ---- coordinate median: hand-computed ---------------------------------------------------------
def test_median_of_three_hand_computed():
    ups = [
        {"w": _f32([1.0, 5.0, -2.0]), "b": np.array([0.5])},
        {"w": _f32([3.0, 0.0, 4.0]), "b": np.array([-1.0])},
        {"w": _f32([2.0, 9.0, 1.0]), "b": np.array([7.0])},
    ]
    out = coordinate_median(ups)
    np.testing.assert_array_equal(out["w"], _f32([2.0, 5.0, 1.0]))
    np.testing.assert_array_equal(out["b"], np.array([0.5]))
    assert list(out) == ["w", "b"]
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float64


def test_median_of_four_is_midpoint_of_middle_two():
    ups = [{"w": _f32([[v, -v]])} for v in (1.0, 10.0, 2.0, 100.0)]
    # sorted 1, 2, 10, 100 -> (2 + 10) / 2 = 6 ; negated -> -6
    np.testing.assert_array_equal(coordinate_median(ups)["w"], _f32([[6.0, -6.0]]))


def test_median_ignores_how_extreme_an_outlier_is():
    honest = [{"w": _f32([1.0, 2.0])}, {"w": _f32([1.5, 2.5])}, {"w": _f32([2.0, 3.0])}]
    attacker = {"w": _f32([1e30, -1e30])}
    extra = {"w": _f32([1.2, 2.2])}
    # per coordinate: 1, 1.2, 1.5, 2, 1e30 -> 1.5 ; -1e30, 2, 2.2, 2.5, 3 -> 2.2
    np.testing.assert_array_equal(
        coordinate_median([*honest, attacker, extra])["w"], _f32([1.5, 2.2])
    )
    milder = {"w": _f32([3.0, 1.0])}  # the same side of the honest values, not as far out
    assert _bits(coordinate_median([*honest, milder, extra])) == _bits(
        coordinate_median([*honest, attacker, extra])
    )


def test_median_integer_and_bool_tensors_are_rounded():
    ups = [
        {"n": np.array([1, 7], np.int64), "m": np.array([True])},
        {"n": np.array([2, 8], np.int64), "m": np.array([False])},
        {"n": np.array([4, 8], np.int64), "m": np.array([True])},
        {"n": np.array([9, 9], np.int64), "m": np.array([True])},
    ]
    out = coordinate_median(ups)
    # n0: (2 + 4) / 2 = 3 ; n1: (8 + 8) / 2 = 8 ; m: (1 + 1) / 2 = 1
    np.testing.assert_array_equal(out["n"], np.array([3, 8], np.int64))
    np.testing.assert_array_equal(out["m"], np.array([True]))
    assert out["n"].dtype == np.int64 and out["m"].dtype == np.bool_


def test_median_of_one_update_is_that_update():
    up = {"w": _f32([[1.0, -2.0]]), "s": np.array(3.0)}
    assert _bits(coordinate_median([up])) == _bits(up)


def test_signed_zeros_give_positive_zero_whatever_the_order():
    ups = [{"w": np.array([-0.0])}, {"w": np.array([0.0])}, {"w": np.array([-0.0])}]
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        shuffled = [ups[i] for i in order]
        assert not np.signbit(coordinate_median(shuffled)["w"][0])
        assert not np.signbit(trimmed_mean(shuffled, 0.34)["w"][0])


# ---- trimmed mean: hand-computed --------------------------------------------------------------
def test_trimmed_mean_k1_of_five_hand_computed():
    ups = [
        {"w": _f32([1.0, -50.0])},
        {"w": _f32([100.0, 1.0])},
        {"w": _f32([3.0, 7.0])},
        {"w": _f32([2.0, 4.0])},
        {"w": _f32([4.0, 9.0])},
    ]
    out = trimmed_mean(ups, 0.2)  # k = floor(0.2 * 5) = 1
    # w0: sorted 1 2 3 4 100 -> mean(2, 3, 4) = 3 ; w1: -50 1 4 7 9 -> mean(1, 4, 7) = 4
    np.testing.assert_array_equal(out["w"], _f32([3.0, 4.0]))
    assert out["w"].dtype == np.float32


def test_trimmed_mean_k_is_floored():
    ups = [{"w": np.array([float(v)])} for v in (0, 1, 2, 3, 14)]
    # 0.39 * 5 = 1.95 -> k = 1 -> mean(1, 2, 3) = 2 ; 0.19 * 5 = 0.95 -> k = 0 -> mean = 4
    np.testing.assert_array_equal(trimmed_mean(ups, 0.39)["w"], np.array([2.0]))
    np.testing.assert_array_equal(trimmed_mean(ups, 0.19)["w"], np.array([4.0]))


def test_trimmed_mean_zero_is_plain_mean_and_integers_round():
    ups = [
        {"w": np.array([1.0, 2.0]), "n": np.array([1], np.int32)},
        {"w": np.array([2.0, 4.0]), "n": np.array([2], np.int32)},
        {"w": np.array([6.0, 0.0]), "n": np.array([2], np.int32)},
    ]
    out = trimmed_mean(ups, 0.0)
    np.testing.assert_array_equal(out["w"], np.array([3.0, 2.0]))
    np.testing.assert_array_equal(out["n"], np.array([2], np.int32))  # 5/3 -> 2
    assert out["n"].dtype == np.int32


def test_trimmed_mean_accumulates_in_float64():
    # float32 would give (2**24 + 1) + 1 = 2**24 ; float64 sums exactly: (2**24 + 2) / 3
    ups = [{"w": _f32([16777216.0])}, {"w": _f32([1.0])}, {"w": _f32([1.0])}]
    assert trimmed_mean(ups, 0.0)["w"][0] == np.float32(5592406.0)


# ---- Krum: hand-computed ----------------------------------------------------------------------
# Five points in 2-D (f = 1, so each score sums the n - f - 2 = 2 smallest squared distances):
#   D(3,1)  B(1,0)  E(10,10)  A(0,0)  C(0,2)          -- indices 0..4
# squared distances: AB 1, AC 4, AD 10, AE 200, BC 5, BD 5, BE 181, CD 10, CE 164, DE 130
#   D: {10, 5, 10, 130} -> 5 + 10 = 15        B: {1, 5, 5, 181}   -> 1 + 5 = 6
#   E: {200, 181, 164, 130} -> 130 + 164 = 294
#   A: {1, 4, 10, 200}  -> 1 + 4 = 5           C: {4, 5, 10, 164}  -> 4 + 5 = 9
POINTS = [(3.0, 1.0), (1.0, 0.0), (10.0, 10.0), (0.0, 0.0), (0.0, 2.0)]
UPDATES_2D = [{"w": np.array(p)} for p in POINTS]


def test_krum_scores_hand_computed():
    assert krum_scores(UPDATES_2D, 1) == [15.0, 6.0, 294.0, 5.0, 9.0]


def test_krum_f0_uses_n_minus_2_neighbours():
    # f = 0: 3 nearest. D: 5+10+10 = 25, B: 1+5+5 = 11, E: 130+164+181 = 475, A: 1+4+10 = 15,
    # C: 4+5+10 = 19
    assert krum_scores(UPDATES_2D, 0) == [25.0, 11.0, 475.0, 15.0, 19.0]


def test_krum_selects_lowest_score():
    out, selected = multi_krum(UPDATES_2D, 1)
    assert selected == [3]
    np.testing.assert_array_equal(out["w"], np.array([0.0, 0.0]))


def test_multi_krum_mean_of_three_best_sorted_indices():
    out, selected = multi_krum(UPDATES_2D, 1, m=3)
    assert selected == [1, 3, 4]  # B (6), A (5), C (9)
    # ((1, 0) + (0, 0) + (0, 2)) / 3
    np.testing.assert_array_equal(out["w"], np.array([1.0, 2.0]) / 3.0)


def test_multi_krum_m_n_minus_f_drops_only_the_outlier():
    out, selected = multi_krum(UPDATES_2D, 1, m=4)
    assert selected == [0, 1, 3, 4]
    np.testing.assert_array_equal(out["w"], np.array([1.0, 0.75]))


def test_krum_ties_broken_by_index():
    square = [{"w": np.array(p)} for p in ((1.0, 1.0), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0))]
    extra = {"w": np.array([9.0, 9.0])}
    ups = [*square, extra]
    assert krum_scores(ups, 1)[:4] == [2.0, 2.0, 2.0, 2.0]
    assert multi_krum(ups, 1)[1] == [0]
    assert multi_krum(ups, 1, m=2)[1] == [0, 1]


def test_krum_distance_ignores_integer_tensors_but_mean_rounds_them():
    ups = [
        {"w": np.array(p), "n": np.array([c], np.int64)}
        for p, c in zip(POINTS, (10, 20, 30, 1_000_000, 41), strict=True)
    ]
    assert krum_scores(ups, 1) == [15.0, 6.0, 294.0, 5.0, 9.0]
    out, selected = multi_krum(ups, 1, m=3)
    assert selected == [1, 3, 4]
    # (20 + 1_000_000 + 41) / 3 = 333353.67 -> 333354
    np.testing.assert_array_equal(out["n"], np.array([333354], np.int64))


def test_krum_float32_tensors_keep_dtype():
    ups = [{"w": p["w"].astype(np.float32)} for p in UPDATES_2D]
    out, _ = multi_krum(ups, 1, m=4)
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], _f32([1.0, 0.75]))


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, float("nan")])
def test_bad_trim_fraction(fraction):
    ups = [{"w": np.array([float(i)])} for i in range(5)]
    with pytest.raises(InvalidWeights, match="trim_fraction"):
        trimmed_mean(ups, fraction)


@pytest.mark.parametrize(("n", "f"), [(4, 1), (3, 1), (6, 2), (2, 0), (1, 0)])
def test_krum_needs_more_than_2f_plus_2(n, f):
    ups = [{"w": np.array([float(i), 0.0])} for i in range(n)]
    with pytest.raises(InvalidWeights, match=r"n > 2f \+ 2"):
        krum_scores(ups, f)
    with pytest.raises(InvalidWeights, match=r"n > 2f \+ 2"):
        multi_krum(ups, f)


@pytest.mark.parametrize("f", [-1, 1.0, True])
def test_krum_bad_f(f):
    with pytest.raises(InvalidWeights, match="f"):
        krum_scores(UPDATES_2D, f)


@pytest.mark.parametrize("m", [0, 5, -1])
def test_multi_krum_bad_m(m):
    with pytest.raises(InvalidWeights, match="m must be"):
        multi_krum(UPDATES_2D, 1, m=m)


MISMATCHED = {
    "names": ({"w": np.zeros(2)}, {"v": np.zeros(2)}, "names differ"),
    "extra tensor": ({"w": np.zeros(2)}, {"w": np.zeros(2), "b": np.zeros(1)}, "names differ"),
    "order": (
        {"w": np.zeros(2), "b": np.zeros(1)},
        {"b": np.zeros(1), "w": np.zeros(2)},
        "order differs",
    ),
    "shape": ({"w": np.zeros(2)}, {"w": np.zeros(3)}, "shape"),
    "dtype": ({"w": np.zeros(2)}, {"w": np.zeros(2, np.float32)}, "dtype"),
    "nan": ({"w": np.zeros(2)}, {"w": np.array([0.0, np.nan])}, "non-finite"),
    "inf": ({"w": np.zeros(2)}, {"w": np.array([np.inf, 0.0])}, "non-finite"),
}


@pytest.mark.parametrize("case", list(MISMATCHED))
@pytest.mark.parametrize(
    "call",
    [
        coordinate_median,
        lambda ups: trimmed_mean(ups, 0.1),
        lambda ups: krum_scores(ups, 0),
        lambda ups: multi_krum(ups, 0),
        screen_updates,
    ],
    ids=["median", "trimmed", "krum_scores", "multi_krum", "screen"],
)
def test_mismatched_or_non_finite_updates_are_refused(case, call):
    good, bad, message = MISMATCHED[case]
    ups = [good, good, bad, good]
    with pytest.raises(InvalidWeights, match=message) as info:
        call(ups)
    assert "update 2" in str(info.value)


@pytest.mark.parametrize(
    "call",
    [coordinate_median, lambda ups: trimmed_mean(ups, 0.0), lambda ups: multi_krum(ups, 0)],
)
def test_no_updates_is_an_error(call):
    with pytest.raises(InvalidWeights, match="no updates"):
        call([])


# ---- hypothesis properties --------------------------------------------------------------------
_VALUES = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def update_sets(draw, min_n=1, max_n=7):
    """n updates sharing a layout: a float32 matrix, a float64 vector, an int32 counter."""
    n = draw(st.integers(min_n, max_n))
    rows = draw(st.integers(1, 3))
    ups = []
    for _ in range(n):
        ups.append(
            {
                "w": draw(hnp.arrays(np.float32, (rows, 2), elements=_VALUES)),
                "b": draw(hnp.arrays(np.float64, (3,), elements=_VALUES)),
                "n": draw(hnp.arrays(np.int32, (1,), elements=st.integers(-1000, 1000))),
            }
        )
    return ups


def _permuted(draw_perm, ups):
    perm = draw_perm(st.permutations(range(len(ups))))
    return perm, [ups[i] for i in perm]


@settings(max_examples=60, deadline=None)
@given(update_sets(), st.data())
def test_median_and_trimmed_mean_are_bit_identical_under_permutation(ups, data):
    _, shuffled = _permuted(data.draw, ups)
    assert _bits(coordinate_median(shuffled)) == _bits(coordinate_median(ups))
    fraction = data.draw(st.floats(0.0, 0.49))
    assert _bits(trimmed_mean(shuffled, fraction)) == _bits(trimmed_mean(ups, fraction))


@settings(max_examples=60, deadline=None)
@given(update_sets(min_n=3), st.data())
def test_krum_scores_permute_and_selected_set_is_order_free(ups, data):
    n = len(ups)
    f = data.draw(st.integers(0, (n - 3) // 2))
    m = data.draw(st.integers(1, n - f))
    perm, shuffled = _permuted(data.draw, ups)
    scores = krum_scores(ups, f)
    assert krum_scores(shuffled, f) == [scores[i] for i in perm]
    _, selected = multi_krum(ups, f, m)
    _, selected_shuffled = multi_krum(shuffled, f, m)
    ranked = sorted(scores)
    if m == n or ranked[m - 1] < ranked[m]:  # no tie at the cut: the same updates are chosen
        assert sorted(perm[i] for i in selected_shuffled) == selected
    else:  # a tie at the cut is broken by index: the chosen scores are the same
        assert sorted(scores[perm[i]] for i in selected_shuffled) == ranked[:m]


@settings(max_examples=40, deadline=None)
@given(update_sets(max_n=1), st.integers(1, 7), st.data())
def test_identical_updates_give_that_update(single, n, data):
    ups = single * n
    _assert_same(coordinate_median(ups), single[0])
    fraction = data.draw(st.floats(0.0, 0.49))
    _assert_same(trimmed_mean(ups, fraction), single[0])
    if n >= 3:
        f = data.draw(st.integers(0, (n - 3) // 2))
        out, _ = multi_krum(ups, f, data.draw(st.integers(1, n - f)))
        _assert_same(out, single[0])


@settings(max_examples=60, deadline=None)
@given(update_sets(), st.floats(0.0, 0.49))
def test_median_and_trimmed_mean_lie_within_input_range(ups, fraction):
    for out in (coordinate_median(ups), trimmed_mean(ups, fraction)):
        for name, a in out.items():
            stack = np.stack([u[name] for u in ups])
            assert (stack.min(axis=0) <= a).all() and (a <= stack.max(axis=0)).all()


@settings(max_examples=40, deadline=None)
@given(update_sets(min_n=3), st.data())
def test_trimmed_mean_lies_within_the_honest_range_with_at_most_k_attackers(ups, data):
    n = len(ups)
    fraction = data.draw(st.floats(1.0 / n, 0.49))
    k = int(np.floor(fraction * n))
    honest = ups[k:]
    signs = data.draw(st.lists(st.sampled_from([-1, 1]), min_size=k, max_size=k))
    attackers = [{name: np.full_like(a, s * 10**6) for name, a in ups[0].items()} for s in signs]
    mixed = [*attackers, *honest]
    for out in (trimmed_mean(mixed, fraction), coordinate_median(mixed)):
        for name, a in out.items():
            stack = np.stack([u[name] for u in honest])
            assert (stack.min(axis=0) <= a).all() and (a <= stack.max(axis=0)).all()


@settings(max_examples=50, deadline=None)
@given(
    f=st.integers(0, 3),
    extra=st.integers(0, 3),
    center=hnp.arrays(np.float64, (4,), elements=st.floats(-100, 100)),
    data=st.data(),
)
def test_multi_krum_never_selects_far_attackers(f, extra, center, data):
    n = 2 * f + 3 + extra
    noise = st.floats(-1.0, 1.0)
    honest = [
        {"w": center + data.draw(hnp.arrays(np.float64, (4,), elements=noise))}
        for _ in range(n - f)
    ]
    collude = data.draw(st.booleans())
    far = st.floats(50.0, 1e4) | st.floats(-1e4, -50.0)
    offset = data.draw(hnp.arrays(np.float64, (4,), elements=far))
    attackers = []
    for _ in range(f):
        if not collude:
            offset = data.draw(hnp.arrays(np.float64, (4,), elements=far))
        attackers.append({"w": center + offset})
    ups = [*honest, *attackers]
    order = data.draw(st.permutations(range(n)))
    shuffled = [ups[i] for i in order]
    is_attacker = [i >= n - f for i in order]
    _, selected = multi_krum(shuffled, f, m=n - f)
    assert len(selected) == n - f
    assert not any(is_attacker[i] for i in selected)
    _, (krum_pick,) = multi_krum(shuffled, f)
    assert not is_attacker[krum_pick]


# ---- screening --------------------------------------------------------------------------------
def _round_deltas():
    rng = np.random.default_rng(7)
    direction = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    honest = [
        {
            "w": (direction["w"] + 0.1 * rng.normal(size=(4, 3))).astype(np.float32),
            "b": (direction["b"] + 0.1 * rng.normal(size=3)).astype(np.float32),
            "n": np.array([100], np.int64),
        }
        for _ in range(6)
    ]
    scaled = {name: a * 10 for name, a in honest[0].items()}
    flipped = {name: -a if a.dtype.kind == "f" else a for name, a in honest[1].items()}
    return honest, scaled, flipped


def test_screening_rejects_scaled_and_sign_flipped_updates():
    honest, scaled, flipped = _round_deltas()
    deltas = [honest[0], honest[1], scaled, honest[2], honest[3], flipped, honest[4], honest[5]]
    reasons = screen_updates(deltas)
    assert [i for i, r in enumerate(reasons) if r is not None] == [2, 5]
    assert reasons[2].startswith("norm ") and "is an outlier (robust z " in reasons[2]
    assert reasons[2].endswith(" > 3)") and "direction" not in reasons[2]
    assert reasons[5].startswith("direction disagrees with the round (cosine -")
    assert reasons[5].endswith(" < 0)") and "norm" not in reasons[5]


def test_screening_reason_numbers_are_the_computed_ones():
    # norms 1, 1, 1.1, 0.9, 10 (all along +x): median 1, MAD = median(0, 0, .1, .1, 9) = 0.1
    deltas = [{"w": np.array([v, 0.0])} for v in (1.0, 1.0, 1.1, 0.9, 10.0)]
    reasons = screen_updates(deltas)
    z = 9.0 / (1.4826 * 0.1)  # 60.7
    assert reasons == [None] * 4 + [f"norm 10 is an outlier (robust z {z:.3g} > 3)"]
    assert reasons[4] == "norm 10 is an outlier (robust z 60.7 > 3)"
    # a direction at 135 degrees to the median (+x) with an ordinary norm
    deltas[1] = {"w": np.array([-1.0, 1.0]) / np.sqrt(2.0)}
    reasons = screen_updates(deltas, min_cosine=-0.5)
    assert reasons[1] == "direction disagrees with the round (cosine -0.71 < -0.5)"


def test_screening_reports_both_reasons():
    deltas = [{"w": np.array([v, 0.0])} for v in (1.0, 1.0, 1.1, 0.9)] + [
        {"w": np.array([-10.0, 0.0])}
    ]
    reason = screen_updates(deltas)[4]
    assert reason.startswith("norm 10 is an outlier") and "; direction disagrees" in reason


def test_screening_mad_zero_rejects_no_norm_and_zero_vectors_pass_direction():
    deltas = [{"w": np.array([1.0, 0.0])}] * 3 + [{"w": np.array([50.0, 0.0])}]
    assert screen_updates(deltas) == [None] * 4  # MAD == 0
    zeros = [{"w": np.zeros(2)}] * 4
    assert screen_updates(zeros) == [None] * 4


def test_screening_fewer_than_three_accepts_all():
    assert screen_updates([]) == []
    pair = [{"w": np.array([1.0])}, {"w": np.array([-1000.0])}]
    assert screen_updates(pair) == [None, None]


@pytest.mark.parametrize("kwargs", [{"norm_z": 0.0}, {"norm_z": float("nan")}, {"min_cosine": 1.5}])
def test_screening_bad_parameters(kwargs):
    with pytest.raises(InvalidWeights):
        screen_updates([{"w": np.ones(1)}] * 3, **kwargs)


@settings(max_examples=40, deadline=None)
@given(update_sets(min_n=3), st.data())
def test_screening_is_order_free(ups, data):
    perm, shuffled = _permuted(data.draw, ups)
    reasons = screen_updates(ups)
    assert screen_updates(shuffled) == [reasons[i] for i in perm]
