"""Server optimisers (FedAvgM, FedAdagrad, FedAdam, FedYogi) against hand-computed steps."""

from __future__ import annotations

import numpy as np
import pytest

from twin_core.errors import InvalidWeights
from twin_core.server_optimizers import (
    ServerOptimizer,
    server_step,
    state_as_weights,
    state_from_weights,
)
from twin_core.weights import load_weights, save_weights


def _w(value: float) -> dict[str, np.ndarray]:
    return {"w": np.array([value], dtype=np.float64)}


def _two_steps(optimizer: ServerOptimizer) -> tuple[float, float]:
    """Start at 1.0; each round the sites move the model by +0.5 (pseudo-gradient 0.5)."""
    x, state = _w(1.0), None
    seen = []
    for _ in range(2):
        x, state = server_step(optimizer, x, _w(float(x["w"][0]) + 0.5), state)
        seen.append(float(x["w"][0]))
    return seen[0], seen[1]


def test_fedavgm_by_hand():
    # m1 = 0.5 -> x = 1.5; m2 = 0.9 * 0.5 + 0.5 = 0.95 -> x = 2.45
    assert _two_steps(ServerOptimizer("fedavgm", lr=1.0, beta1=0.9)) == pytest.approx((1.5, 2.45))


def test_fedadagrad_by_hand():
    # m1 = 0.1 * 0.5 = 0.05, v1 = 0.25: x = 1 + 0.1 * 0.05 / (0.5 + 0.001)
    first = 1 + 0.1 * 0.05 / 0.501
    # m2 = 0.9 * 0.05 + 0.05 = 0.095, v2 = 0.5: x += 0.1 * 0.095 / (sqrt(0.5) + 0.001)
    second = first + 0.1 * 0.095 / (np.sqrt(0.5) + 0.001)
    got = _two_steps(ServerOptimizer("fedadagrad", lr=0.1))
    assert got == pytest.approx((first, second), rel=1e-12)


def test_fedadam_and_fedyogi_by_hand():
    # step 1 is the same: m = 0.05, v = 0.01 * 0.25 = 0.0025, x = 1 + 0.1 * 0.05 / (0.05 + 0.001)
    first = 1 + 0.1 * 0.05 / 0.051
    # step 2, Adam: v = 0.99 * 0.0025 + 0.0025 = 0.004975
    adam = first + 0.1 * 0.095 / (np.sqrt(0.004975) + 0.001)
    # step 2, Yogi: v = 0.0025 - 0.01 * 0.25 * sign(0.0025 - 0.25) = 0.005
    yogi = first + 0.1 * 0.095 / (np.sqrt(0.005) + 0.001)
    assert _two_steps(ServerOptimizer("fedadam", lr=0.1)) == pytest.approx((first, adam), rel=1e-12)
    assert _two_steps(ServerOptimizer("fedyogi", lr=0.1)) == pytest.approx((first, yogi), rel=1e-12)


def test_fedavgm_without_momentum_at_lr_one_is_fedavg():
    rng = np.random.default_rng(0)
    current = {"a": rng.normal(size=(4, 3)).astype(np.float32), "n": np.array([7], np.int64)}
    aggregate = {"a": rng.normal(size=(4, 3)).astype(np.float32), "n": np.array([9], np.int64)}
    out, state = server_step(ServerOptimizer("fedavgm", lr=1.0, beta1=0.0), current, aggregate)
    assert out["a"].dtype == np.float32 and np.array_equal(out["a"], aggregate["a"])
    assert out["n"].tolist() == [9] and state.step == 1


def test_state_survives_a_restart(tmp_path):
    optimizer = ServerOptimizer("fedadam", lr=0.05)
    x = {"w": np.linspace(0, 1, 5).astype(np.float32)}
    target = {"w": np.full(5, 2.0, np.float32)}
    x1, state = server_step(optimizer, x, target)
    tensors, meta = state_as_weights(state)
    save_weights(tmp_path / "server_state.twt", tensors, meta)
    stored = load_weights(tmp_path / "server_state.twt")
    resumed = state_from_weights(stored.weights, stored.meta)
    continued, _ = server_step(optimizer, x1, target, state)
    after_restart, _ = server_step(optimizer, x1, target, resumed)
    assert resumed.step == 1 and np.array_equal(continued["w"], after_restart["w"])


def test_bad_settings_and_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="unknown server optimiser 'fedmagic'"):
        ServerOptimizer("fedmagic")
    with pytest.raises(ValueError, match="invalid server optimiser settings"):
        ServerOptimizer("fedadam", beta2=1.0)
    with pytest.raises(InvalidWeights, match="differ"):
        server_step(ServerOptimizer("fedadam"), _w(1.0), {"v": np.array([1.0])})
    with pytest.raises(InvalidWeights, match="shape"):
        server_step(ServerOptimizer("fedadam"), _w(1.0), {"w": np.zeros(2)})
