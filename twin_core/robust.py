"""Byzantine-robust aggregation and update screening, as plain functions over plain values.

FedAvg (`twin_core.aggregation`) lets a single site move the mean anywhere. The aggregators here
bound what a minority of bad updates (faulty or malicious sites) can do to the candidate:

- `coordinate_median` and `trimmed_mean`: Yin et al., "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018.
- `krum_scores` and `multi_krum`: Blanchard et al., "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017.
- `screen_updates`: a screening heuristic (robust z-score of the update norms, cosine to the
  coordinate-wise median update) that names why an update looks wrong; it gives no formal
  guarantee.

Every function takes a sequence of models (`Weights`, one per site, in sorted site order) that
share tensor names, order, dtypes and shapes, and raises `InvalidWeights` for bad input: no
updates, mismatched layouts, NaN or infinity in a floating tensor, or parameters out of range.
All arithmetic is float64; results are cast back to each tensor's dtype (integer and bool
tensors are rounded to the nearest integer, ties to even, as in `WeightedMean`). Results do not
depend on the order of the updates: per coordinate, values are sorted before they are combined,
so permuting the input gives bit-identical tensors (up to Krum's documented tie-break by index).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from twin_core.errors import InvalidWeights
from twin_core.weights import Weights, check_compatible, non_finite_tensors

# Scale that makes the median absolute deviation a consistent estimator of the standard
# deviation for normally distributed data (1 / Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826


# ---- shared checks and helpers ----------------------------------------------------------------
def _checked(updates: Sequence[Mapping[str, np.ndarray]], *, allow_empty: bool = False) -> list:
    """The updates as lists of arrays, after checking they share one layout and are finite."""
    arrays = [{name: np.asarray(a) for name, a in u.items()} for u in updates]
    if not arrays:
        if allow_empty:
            return arrays
        raise InvalidWeights("no updates to aggregate")
    first = arrays[0]
    for i, update in enumerate(arrays):
        if i:
            try:
                check_compatible(update, first)
            except InvalidWeights as exc:
                raise InvalidWeights(f"update {i} does not match update 0: {exc}") from None
        bad = non_finite_tensors(update)
        if bad:
            raise InvalidWeights(f"update {i} has non-finite values (NaN or inf) in {bad}")
    return arrays


def _sorted_stack(arrays: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    """Tensor `name` of every update as float64, stacked on axis 0 and sorted along it."""
    return np.sort(np.stack([u[name].astype(np.float64) for u in arrays]), axis=0)


def _cast_back(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # `+ 0.0` turns -0.0 into +0.0: sorting does not order signed zeros, so without it the
    # sign of a zero result could depend on the input order.
    values = values + 0.0
    return np.rint(values).astype(dtype) if dtype.kind in "iub" else values.astype(dtype)


def _median_f64(arrays: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    n = len(arrays)
    for name in arrays[0]:
        ordered = _sorted_stack(arrays, name)
        lo, hi = ordered[(n - 1) // 2], ordered[n // 2]
        out[name] = lo if n % 2 else lo + (hi - lo) / 2.0
    return out


def _floating(arrays: list[dict[str, np.ndarray]]) -> list[str]:
    return [name for name, a in arrays[0].items() if a.dtype.kind == "f"]


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidWeights(f"{what} must be an integer, got {value!r}")
    return int(value)


# ---- Yin et al. 2018 --------------------------------------------------------------------------
def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> Weights:
    """Element-wise median of the updates, per tensor (Yin et al., "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).

    Computed in float64 (for an even count, the midpoint of the two middle values) and cast back
    to each tensor's dtype; integer and bool tensors are rounded.

    Guarantee: in every coordinate, if fewer than half of the updates are bad, the result lies
    within [min, max] of the good updates' values, however extreme the bad values are (breakdown
    point 1/2). Yin et al. show that, for i.i.d. good updates, it attains an order-optimal
    statistical error rate. It always lies within [min, max] of all inputs.

    >>> import numpy as np
    >>> ups = [np.array([1.0, 5.0]), np.array([3.0, 0.0]), np.array([2.0, 9.0])]
    >>> coordinate_median([{"w": w} for w in ups])["w"]
    array([2., 5.])
    """
    arrays = _checked(updates)
    median = _median_f64(arrays)
    return {name: _cast_back(median[name], a.dtype) for name, a in arrays[0].items()}


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Weights:
    """Element-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018).

    Per coordinate, drops the k = floor(trim_fraction * n) largest and k smallest of the n
    values and averages the remaining n - 2k in float64; `trim_fraction` must be in [0, 0.5).
    `trim_fraction = 0` is the plain mean.

    Guarantee: in every coordinate, if at most k updates are bad, the result lies within
    [min, max] of the good updates' values, however extreme the bad values are. Yin et al. show
    an order-optimal statistical error rate when the fraction of bad updates is below
    `trim_fraction`. It always lies within [min, max] of all inputs.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise InvalidWeights(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    arrays = _checked(updates)
    n = len(arrays)
    k = math.floor(trim_fraction * n)
    if 2 * k >= n:
        raise InvalidWeights(f"trimming {k} from each end of {n} updates leaves nothing")
    out: Weights = {}
    for name, a in arrays[0].items():
        kept = _sorted_stack(arrays, name)[k : n - k]
        out[name] = _cast_back(kept.sum(axis=0) / (n - 2 * k), a.dtype)
    return out


# ---- Blanchard et al. 2017 --------------------------------------------------------------------
def _krum_scores(arrays: list[dict[str, np.ndarray]], f: int) -> list[float]:
    n = len(arrays)
    f = _check_int(f, "f")
    if f < 0:
        raise InvalidWeights(f"f (the number of bad updates tolerated) must be >= 0, got {f}")
    if n <= 2 * f + 2:
        raise InvalidWeights(f"Krum needs n > 2f + 2 updates: got n = {n} for f = {f}")
    names = _floating(arrays)
    flat = [
        np.concatenate([u[name].astype(np.float64).ravel() for name in names] + [np.zeros(0)])
        for u in arrays
    ]
    dist = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = flat[i] - flat[j]
            dist[i, j] = dist[j, i] = float(np.dot(diff, diff))
    closest = n - f - 2
    scores = []
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))[:closest]
        scores.append(float(sum(others.tolist())))
    return scores


def krum_scores(updates: Sequence[Mapping[str, np.ndarray]], f: int) -> list[float]:
    """Krum score of each update (Blanchard et al., "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS 2017).

    An update's score is the sum of its squared L2 distances to its n - f - 2 nearest other
    updates, over all floating tensors flattened in float64 (integer and bool tensors do not
    count). Requires n > 2f + 2, where f is the number of bad updates to tolerate.

    A low score means the update sits in a tight group of n - f - 2 others; with at most f bad
    updates, at least n - 2f - 2 >= 1 of those neighbours are good, so a bad update can only
    score low by staying close to good ones.
    """
    return _krum_scores(_checked(updates), f)


def multi_krum(
    updates: Sequence[Mapping[str, np.ndarray]], f: int, m: int = 1
) -> tuple[Weights, list[int]]:
    """Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017): select the m updates with the lowest Krum scores (ties
    broken by lower index) and return their plain mean (float64 accumulation, cast back to each
    tensor's dtype, integer tensors rounded) with the selected indices, sorted. m = 1 is Krum;
    1 <= m <= n - f.

    Guarantee: Blanchard et al. prove Krum (alpha, f)-Byzantine resilient for n > 2f + 2: with
    good updates i.i.d. around the true gradient and variance small relative to its norm, the
    selected update stays within a bounded angle of the true gradient, whatever the f bad
    updates are. A direct consequence of the score: if every good-good squared distance is at
    most d and every bad-good one exceeds d * (n - f - 2) / (n - 2f - 1), every good update
    scores below every bad one, so no bad update is selected for any m <= n - f.
    """
    arrays = _checked(updates)
    n = len(arrays)
    scores = _krum_scores(arrays, f)
    m = _check_int(m, "m")
    if not 1 <= m <= n - f:
        raise InvalidWeights(f"m must be in [1, n - f] = [1, {n - f}], got {m}")
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    selected = sorted(ranked[:m])
    chosen = [arrays[i] for i in selected]
    out: Weights = {}
    for name, a in arrays[0].items():
        out[name] = _cast_back(_sorted_stack(chosen, name).sum(axis=0) / m, a.dtype)
    return out, selected


# ---- screening --------------------------------------------------------------------------------
def screen_updates(
    deltas: Sequence[Mapping[str, np.ndarray]], *, norm_z: float = 3.0, min_cosine: float = 0.0
) -> list[str | None]:
    """Screen each delta (an update minus the round's start model); None accepts it, a string
    says why it is rejected.

    Two checks, over floating tensors in float64:

    - norm: with `med` and `mad` the median and median absolute deviation of the round's delta
      L2 norms, reject when |norm - med| / (1.4826 * mad) > `norm_z` (a robust z-score; the
      factor makes the MAD estimate a standard deviation for normal data). When mad == 0 the
      norm check rejects nothing.
    - direction: reject when the cosine similarity between the delta and the coordinate-wise
      median delta is below `min_cosine` (skipped when either vector is zero).

    With fewer than 3 deltas every one is accepted. This is a heuristic filter to explain and
    drop gross outliers (scaled, sign-flipped or stray updates); it gives no Byzantine-resilience
    guarantee of its own, and colluding updates that stay near the round's median pass it.
    """
    if not (math.isfinite(norm_z) and norm_z > 0):
        raise InvalidWeights(f"norm_z must be a positive number, got {norm_z!r}")
    if not -1.0 <= min_cosine <= 1.0:
        raise InvalidWeights(f"min_cosine must be in [-1, 1], got {min_cosine!r}")
    arrays = _checked(deltas, allow_empty=True)
    n = len(arrays)
    if n < 3:
        return [None] * n
    names = _floating(arrays)
    median = _median_f64(arrays)
    ref = np.concatenate([median[name].ravel() for name in names] + [np.zeros(0)])
    ref_norm = math.sqrt(float(np.dot(ref, ref)))
    flat = [
        np.concatenate([u[name].astype(np.float64).ravel() for name in names] + [np.zeros(0)])
        for u in arrays
    ]
    norms = np.array([math.sqrt(float(np.dot(v, v))) for v in flat])
    med = float(np.median(norms))
    mad = float(np.median(np.abs(norms - med)))
    reasons: list[str | None] = []
    for v, norm in zip(flat, norms.tolist(), strict=True):
        why = []
        if mad > 0:
            z = abs(norm - med) / (MAD_TO_SIGMA * mad)
            if z > norm_z:
                why.append(f"norm {norm:.3g} is an outlier (robust z {z:.3g} > {norm_z:g})")
        if norm > 0 and ref_norm > 0:
            cosine = float(np.dot(v, ref)) / (norm * ref_norm)
            if cosine < min_cosine:
                why.append(
                    f"direction disagrees with the round (cosine {cosine:.2f} < {min_cosine:g})"
                )
        reasons.append("; ".join(why) if why else None)
    return reasons
