"""Server-side optimisers: treat the round's aggregate minus the global model as a
pseudo-gradient and take an optimiser step with it.

FedAvgM: Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019 (server momentum).
FedAdagrad, FedAdam, FedYogi: Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2 (defaults beta1 0.9, beta2 0.99, tau 1e-3 as in the paper).

The optimiser state (moments) is a plain value the caller persists between rounds, so a campaign
can resume after a crash with the same trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from twin_core.errors import InvalidWeights
from twin_core.weights import Weights

OPTIMIZERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptimizer:
    name: str
    lr: float = 1e-2  # server learning rate (eta); FedAvgM usually runs at 1.0
    beta1: float = 0.9  # momentum (FedAvgM) or first-moment decay
    beta2: float = 0.99  # second-moment decay (FedAdam, FedYogi)
    tau: float = 1e-3  # adaptivity: keeps the denominator away from zero

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"unknown server optimiser {self.name!r} (choose {', '.join(OPTIMIZERS)})"
            )
        if not self.lr > 0 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1 or self.tau < 0:
            raise ValueError(f"invalid server optimiser settings {self}")


@dataclass(frozen=True)
class ServerState:
    """Moments per floating tensor (float64) and the number of steps taken."""

    step: int = 0
    first: dict[str, np.ndarray] = field(default_factory=dict)  # m (or momentum buffer v)
    second: dict[str, np.ndarray] = field(default_factory=dict)  # v (adaptive methods)


def server_step(
    optimizer: ServerOptimizer,
    current: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    state: ServerState | None = None,
) -> tuple[Weights, ServerState]:
    """The next global model and optimiser state.

    Only floating-point tensors move; other tensors (counters) take the aggregate's value.
    Arithmetic is float64; results are cast back to each tensor's dtype.
    """
    if list(current) != list(aggregate):
        raise InvalidWeights("the aggregate's tensors differ from the global model's")
    state = state or ServerState()
    first, second, out = dict(state.first), dict(state.second), {}
    for name, x in current.items():
        if x.dtype.kind != "f":
            out[name] = np.array(aggregate[name], copy=True)
            continue
        if aggregate[name].shape != x.shape:
            raise InvalidWeights(f"tensor {name!r} shape {aggregate[name].shape} != {x.shape}")
        x64 = x.astype(np.float64)
        delta = aggregate[name].astype(np.float64) - x64  # the pseudo-gradient (a descent step)
        m = first.get(name, np.zeros_like(x64))
        if optimizer.name == "fedavgm":
            m = optimizer.beta1 * m + delta
            new = x64 + optimizer.lr * m
        else:
            m = optimizer.beta1 * m + (1 - optimizer.beta1) * delta
            v = second.get(name, np.zeros_like(x64))
            d2 = delta * delta
            if optimizer.name == "fedadagrad":
                v = v + d2
            elif optimizer.name == "fedadam":
                v = optimizer.beta2 * v + (1 - optimizer.beta2) * d2
            else:  # fedyogi
                v = v - (1 - optimizer.beta2) * d2 * np.sign(v - d2)
            second[name] = v
            new = x64 + optimizer.lr * m / (np.sqrt(v) + optimizer.tau)
        first[name] = m
        out[name] = new.astype(x.dtype)
    return out, ServerState(state.step + 1, first, second)


def state_as_weights(state: ServerState) -> tuple[Weights, dict]:
    """The state as named tensors plus JSON metadata, for `save_weights`."""
    tensors = {f"first/{k}": v for k, v in state.first.items()}
    tensors.update({f"second/{k}": v for k, v in state.second.items()})
    return tensors, {"step": state.step}


def state_from_weights(tensors: Mapping[str, np.ndarray], meta: Mapping) -> ServerState:
    first = {k.split("/", 1)[1]: np.array(v) for k, v in tensors.items() if k.startswith("first/")}
    second = {
        k.split("/", 1)[1]: np.array(v) for k, v in tensors.items() if k.startswith("second/")
    }
    return ServerState(int(meta.get("step", 0)), first, second)
