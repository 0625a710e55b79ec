"""SiteHandler with update compression: the payload it sends, the error-feedback residual it
keeps (across a worker restart, per model shape, and once per round), and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from site_worker.data import load_file
from site_worker.handler import SiteHandler
from twin_core.compression import MARKER, decode_update, method_of
from twin_core.errors import SiteCallError
from twin_core.federation import TrainConfig, pool_moments
from twin_core.secagg import MaskingPlan
from twin_core.training import weights_of

SITE = "site-2"


def _handler(cohort_dir: Path, state_dir: Path | None = None) -> SiteHandler:
    schema, frame = load_file(cohort_dir / "sites" / f"{SITE}.csv", cohort_dir / "schema.yaml")
    return SiteHandler(SITE, schema, frame, state_dir=state_dir)


def _start(handler: SiteHandler):
    moments = pool_moments([handler.info().moments])
    return weights_of(handler.task.build_model(moments, seed=0))


def _config(method: str, **kwargs) -> TrainConfig:
    return TrainConfig(local_steps=3, seed=1, compression=method, topk_fraction=0.1, **kwargs)


def test_the_residual_survives_a_restart_and_a_re_executed_round_reuses_it(
    cohort_dir: Path, tmp_path: Path
):
    state = tmp_path / "state"
    handler = _handler(cohort_dir, state)
    start = _start(handler)
    fingerprint = handler.schema.fingerprint
    first = handler.train("r0001", fingerprint, _config("topk"), start)
    assert method_of(first.weights) == "topk" and MARKER in first.weights
    assert first.metrics["compression_residual_norm"] > 0
    assert (state / "compression_residual.twt").exists()
    second = handler.train("r0002", fingerprint, _config("topk"), start)

    # a restarted worker re-executing r0002 starts from the residual r0002 started from
    again = _handler(cohort_dir, state)
    retried = again.train("r0002", fingerprint, _config("topk"), start)
    for key in second.weights:
        assert np.array_equal(second.weights[key], retried.weights[key]), key
    assert retried.metrics["compression_residual_norm"] == pytest.approx(
        second.metrics["compression_residual_norm"]
    )

    again.forget_residual()
    assert again._residual is None and not (state / "compression_residual.twt").exists()

    # without the residual (a fresh site), the same training sends something else
    no_memory = _handler(cohort_dir).train("r0002", fingerprint, _config("topk"), start)
    assert not all(
        np.array_equal(no_memory.weights[k], retried.weights[k]) for k in retried.weights
    )


def test_a_new_model_shape_starts_from_a_zero_residual(cohort_dir: Path):
    handler = _handler(cohort_dir)
    start = _start(handler)
    handler.train("r0001", handler.schema.fingerprint, _config("int8"), start)
    key_before = handler._residual["key"]
    assert handler._residual_key({k: v[..., :1] for k, v in start.items()}) != key_before
    assert handler._residual_key(dict(start)) == key_before


@pytest.mark.parametrize("method", ["float16", "int8", "topk"])
def test_each_method_decodes_to_a_model_of_the_start_models_shape(cohort_dir: Path, method):
    handler = _handler(cohort_dir)
    start = _start(handler)
    update = handler.train("r0001", handler.schema.fingerprint, _config(method), start)
    trained = decode_update(update.weights, start)
    assert list(trained) == list(start)
    assert all(trained[k].shape == start[k].shape for k in start)
    assert all(trained[k].dtype == start[k].dtype for k in start)


def test_under_dp_fedavg_the_decoded_update_stays_within_the_clip(cohort_dir: Path):
    handler = _handler(cohort_dir)
    start = _start(handler)
    for round_key in ("r0001", "r0002"):
        update = handler.train(
            round_key, handler.schema.fingerprint, _config("int8", dp_clip=0.05), start
        )
        trained = decode_update(update.weights, start)
        delta = np.sqrt(
            sum(
                float(np.sum((trained[k].astype(np.float64) - start[k]) ** 2))
                for k in start
                if start[k].dtype.kind == "f"
            )
        )
        assert delta <= 0.05 * (1 + 1e-4)


def test_the_site_refuses_unknown_methods_and_compression_under_masking(cohort_dir: Path):
    handler = _handler(cohort_dir)
    start = _start(handler)
    with pytest.raises(SiteCallError, match="unknown compression 'zip'"):
        handler.train("r0001", handler.schema.fingerprint, _config("zip"), start)
    with pytest.raises(SiteCallError, match="topk_fraction"):
        handler.train(
            "r0001",
            handler.schema.fingerprint,
            TrainConfig(compression="topk", topk_fraction=1.5),
            start,
        )
    with pytest.raises(SiteCallError, match="secure aggregation"):
        handler.train(
            "r0001",
            handler.schema.fingerprint,
            _config("int8"),
            start,
            masking=MaskingPlan(shared=("a", "b"), incoming=(), weighting="examples"),
        )
