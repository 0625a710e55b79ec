"""SCAFFOLD: control variates that correct client drift on non-IID data.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1 with option II for the site's control variate:

    site i, K local SGD steps of size eta:  y <- y - eta * (g_i(y) - c_i + c)
    then                                    c_i+ = c_i - c + (x - y) / (K * eta)
    server, sites S of N:                   x <- x + eta_g * mean(y_i - x)
                                            c <- c + |S| / N * mean(c_i+ - c_i)

The server's c travels to the sites beside the model, as tensors named CONTROL + name; each site
keeps its own c_i (persisted at the site) and answers with c_i+ - c_i as DELTA + name tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from twin_core.weights import Weights

CONTROL = "scaffold.c/"
DELTA = "scaffold.dc/"


def split(weights: Mapping[str, np.ndarray], prefix: str) -> tuple[Weights, Weights]:
    """(the model's tensors, the tensors under `prefix` with the prefix removed)."""
    model = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    extra = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    return model, extra


def join(model: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray], prefix: str) -> Weights:
    return {**model, **{prefix + k: v for k, v in extra.items()}}


def zeros_like(model: Mapping[str, np.ndarray]) -> Weights:
    """A zero control variate for every floating tensor of the model."""
    return {k: np.zeros(v.shape, np.float32) for k, v in model.items() if v.dtype.kind == "f"}


def new_site_control(
    site: Mapping[str, np.ndarray],
    server: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    steps: int,
    lr: float,
) -> Weights:
    """Option II: c_i+ = c_i - c + (x - y) / (K * eta)."""
    scale = 1.0 / (max(steps, 1) * lr)
    return {
        k: (
            site[k].astype(np.float64)
            - server[k]
            + (start[k].astype(np.float64) - trained[k]) * scale
        ).astype(np.float32)
        for k in server
    }


def server_control(
    control: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]], total_sites: int
) -> Weights:
    """c + |S| / N * mean(delta c_i), with |S| = len(deltas) sites of N = total_sites."""
    if not deltas:
        return dict(control)
    share = len(deltas) / max(total_sites, len(deltas))
    out = {}
    for k, c in control.items():
        mean = sum(d[k].astype(np.float64) for d in deltas) / len(deltas)
        out[k] = (c.astype(np.float64) + share * mean).astype(np.float32)
    return out
