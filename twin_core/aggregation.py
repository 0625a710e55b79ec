"""Aggregation of site updates into one candidate model.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The candidate is the example-weighted mean of the sites' weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from twin_core.errors import InvalidWeights
from twin_core.weights import Weights


class WeightedMean:
    """Streaming weighted mean of models: add one update at a time, memory of one model.

    Accumulates in float64 so the result does not depend on float32 rounding of partial sums;
    callers feed updates in sorted site order so the result is bit-for-bit reproducible.
    Integer tensors (counters such as BatchNorm's `num_batches_tracked`) take the weighted
    mean rounded to the nearest integer.
    """

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._total = 0.0
        self.count = 0

    def add(self, weights: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise InvalidWeights(f"aggregation weight must be positive, got {weight}")
        if not self._sums:
            self._dtypes = {n: a.dtype for n, a in weights.items()}
            self._sums = {n: np.zeros(a.shape, dtype=np.float64) for n, a in weights.items()}
        elif list(weights) != list(self._sums):
            raise InvalidWeights("update tensor names differ from the first update's")
        for name, array in weights.items():
            acc = self._sums[name]
            if array.shape != acc.shape:
                raise InvalidWeights(f"tensor {name!r} shape {array.shape} != {acc.shape}")
            acc += np.asarray(array, dtype=np.float64) * weight
        self._total += float(weight)
        self.count += 1

    def result(self) -> Weights:
        if not self.count:
            raise InvalidWeights("no updates to aggregate")
        out: Weights = {}
        for name, acc in self._sums.items():
            mean = acc / self._total
            dtype = self._dtypes[name]
            out[name] = np.rint(mean).astype(dtype) if dtype.kind in "iub" else mean.astype(dtype)
        return out


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Weighted mean of `(weights, num_examples)` pairs, streamed in the order given.

    >>> import numpy as np
    >>> fedavg([({"w": np.array([1.0])}, 1), ({"w": np.array([4.0])}, 2)])["w"]
    array([3.])
    """
    mean = WeightedMean()
    for weights, weight in updates:
        mean.add(weights, weight)
    return mean.result()
