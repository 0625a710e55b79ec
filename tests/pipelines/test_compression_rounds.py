"""Rounds with update compression over in-process sites: the model still learns, the bytes on
the wire shrink by each method's factor, and a corrupt compressed update is refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.conftest import SITES
from tests.pipelines.hostile_sites import Tampered
from twin_core.weights import load_weights
from twin_pipelines.campaign import run_campaign, run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.resources import InProcessFleet

# uncompressed / on the wire: float16 halves float32, int8 quarters it (plus one float32 scale
# per tensor), top-k sends an int32 index and a float32 value per entry kept: 1 / (2 x 0.1)
EXPECTED_RATIO = {
    "none": (1.0, 1.0),
    "float16": (1.99, 2.0),
    "int8": (3.8, 4.0),
    "topk": (4.0, 5.0),
}


def _fresh_sites(make_handler) -> dict:
    """New handlers (no residual left by another test), their data checked before the round
    (the check takes seconds on a loaded machine: not within the info call's deadline)."""
    handlers = {s: make_handler(s) for s in SITES}
    for handler in handlers.values():
        handler.check_data()
    return handlers


def _wire(env, round_key: str) -> list[dict]:
    updates = env.store.round_dir(round_key) / "updates"
    return [load_weights(p).meta["wire"] for p in sorted(updates.glob("*.twt"))]


@pytest.mark.parametrize("method", ["none", "float16", "int8", "topk"])
def test_compressed_rounds_learn_and_shrink_the_bytes(make_handler, round_env, instance, method):
    env = round_env(InProcessFleet(_fresh_sites(make_handler)))
    config = RoundConfig(min_sites=4, compression=method, topk_fraction=0.1)
    results = run_campaign(env.defs, instance, 3, config)
    assert all(r.success for r in results), [r.error for r in results]
    losses = [r.pooled["loss"] for r in results]
    assert losses[-1] < losses[0], losses
    low, high = EXPECTED_RATIO[method]
    for result in results:
        wire = _wire(env, result.round_key)
        assert len(wire) == 4 and all(w["compression"] == method for w in wire)
        ratio = sum(w["model"] for w in wire) / sum(w["bytes"] for w in wire)
        assert low <= ratio <= high, (method, ratio)
    version = env.versions()[-1]
    if method != "none":
        assert f'"compression": "{method}"' in version.tags["twin.strategy_params"]


def _index_past_the_end(weights):
    key = next(k for k in weights if k.endswith("::topk.index"))
    return {**weights, key: weights[key] + np.int32(1_000_000)}


def _nan_scale(weights):
    key = next(k for k in weights if k.endswith("::scale"))
    return {**weights, key: np.array([np.nan], np.float32)}


def test_a_corrupt_compressed_update_is_refused_with_its_reason(make_handler, round_env, instance):
    handlers = _fresh_sites(make_handler)
    handlers["site-4"] = Tampered(handlers["site-4"], update=_index_past_the_end)
    env = round_env(InProcessFleet(handlers))
    config = RoundConfig(min_sites=3, compression="topk", topk_fraction=0.1)
    result = run_round(env.defs, instance, config)
    assert result.success, result.error
    assert result.failed_sites == ("site-4",)
    rejected = load_weights(env.store.round_dir(result.round_key) / "rejected" / "site-4.twt")
    assert "::topk.index out of range" in rejected.meta["reason"]
    assert "compression::method" in rejected.weights  # the payload as it came, kept as evidence


def test_a_site_answering_uncompressed_is_refused(make_handler, round_env, instance):
    """The round asks for int8; a site that sends its full weights does not fit the config."""

    class Uncompressed:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def train(self, round_key, fingerprint, config, weights, timeout, masking=None):
            return self.inner.train(
                round_key, fingerprint, replace(config, compression="none"), weights, timeout
            )

    handlers = {s: h for s, h in _fresh_sites(make_handler).items() if s in SITES[:3]}
    handlers["site-1"] = Uncompressed(handlers["site-1"])
    env = round_env(InProcessFleet(handlers))
    result = run_round(env.defs, instance, RoundConfig(min_sites=3, compression="int8"))
    assert not result.success
    assert "compressed with 'none' but the round asks for 'int8'" in result.error


@pytest.mark.integration
def test_int8_rounds_over_grpc_and_a_corrupt_update_refused(make_handler, round_env, instance):
    """Real gRPC (codec, chunked streams, the TrainConfig's new fields) to site handlers served
    in this process; site-4 answers with a damaged payload."""
    from site_worker.server import SiteServer
    from twin_pipelines.resources import GrpcFleet

    handlers = _fresh_sites(make_handler)
    handlers["site-4"] = Tampered(handlers["site-4"], update=_nan_scale)
    server = SiteServer(handlers, "127.0.0.1", 0)
    server.start()
    try:
        endpoints = ",".join(f"{s}=127.0.0.1:{server.port}" for s in SITES)
        env = round_env(GrpcFleet(endpoints=endpoints, insecure=True))
        config = RoundConfig(min_sites=3, compression="int8", secure_aggregation=False)
        results = run_campaign(env.defs, instance, 2, config)
    finally:
        server.stop(grace=0)
    assert all(r.success for r in results), [r.error for r in results]
    assert results[1].pooled["loss"] < results[0].pooled["loss"]
    for result in results:
        assert result.failed_sites == ("site-4",)
        wire = _wire(env, result.round_key)
        assert len(wire) == 3
        assert 3.8 <= sum(w["model"] for w in wire) / sum(w["bytes"] for w in wire) <= 4.0
        rejected = env.store.round_dir(result.round_key) / "rejected" / "site-4.twt"
        assert "::scale is nan, expected a finite scale" in load_weights(rejected).meta["reason"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compression": "zip"}, "unknown compression 'zip'"),
        ({"compression": "topk", "topk_fraction": 0.0}, "topk_fraction must be in (0, 1]"),
        (
            {"compression": "int8", "secure_aggregation": True},
            "compression int8 cannot run with secure aggregation",
        ),
        (
            {"compression": "float16", "strategy": "scaffold", "optimizer": "sgd"},
            "compression float16 cannot run with strategy scaffold",
        ),
    ],
)
def test_the_config_refuses_what_compression_cannot_do(settings, message):
    problems = RoundConfig(**settings).problems()
    assert any(message in p for p in problems), problems


def test_none_is_the_default_and_fits_every_other_setting():
    assert RoundConfig().compression == "none"
    assert RoundConfig(secure_aggregation=True).problems() == []


def test_the_train_config_carries_compression_over_the_wire():
    from twin_wire import codec

    config = RoundConfig(compression="topk", topk_fraction=0.25).train_config(seed=3)
    back = codec.config_from_proto(codec.config_to_proto(config))
    assert (back.compression, back.topk_fraction) == ("topk", 0.25)
    older = codec.config_from_proto(codec.pb.TrainConfig())  # a sender without the fields
    assert (older.compression, older.topk_fraction) == ("none", 0.1)
