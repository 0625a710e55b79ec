"""SiteHandler: one site's data and model work, in plain Python (the `Site` port).

The gRPC servicer decodes requests and calls this; tests and in-process simulations call it
directly. Refusals are SiteCallError with a gRPC status name as the code.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from twin_core.errors import InvalidWeights, SiteCallError
from twin_core.federation import SiteEvaluation, SiteInfo, SiteUpdate, TrainConfig
from twin_core.schema import DataSchema
from twin_core.tasks import task_for
from twin_core.training import evaluate, load_weights_into, train_local, weights_of

PROTOCOL = "twin_wire.v1"


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("twin-pipelines")
    except PackageNotFoundError:
        own = "unknown"
    return {
        "twin_pipelines": own,
        "protocol": PROTOCOL,
        "torch": torch.__version__.split("+")[0],
        "python": platform.python_version(),
    }


class SiteHandler:
    """Holds a site's prepared data; trains and evaluates models sent to it, one at a time."""

    def __init__(
        self,
        site_id: str,
        schema: DataSchema,
        frame: pd.DataFrame,
        *,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        state_dir: Path | None = None,
    ) -> None:
        self.site_id = site_id
        self.schema = schema
        self.task = task_for(schema)
        self.data = self.task.prepare(frame, holdout_fraction, split_seed)
        self.state_dir = Path(state_dir) if state_dir else None
        self._model = self.task.build_model({}, seed=0)
        self._lock = threading.Lock()
        self._versions = software_versions()

    def warm_up(self) -> None:
        """Run one training step on a throwaway copy so the first real round is not slow."""
        if not self.data.train_examples:
            return
        model = self.task.build_model({}, seed=0)
        batch = tuple(t[:8] for t in self.data.train.tensors)
        self.task.loss(model, batch).backward()
        evaluate(self.task, model, self.data.holdout)

    def info(self, timeout: float | None = None) -> SiteInfo:
        return SiteInfo(
            site_id=self.site_id,
            task=self.task.name,
            schema=self.schema.document,
            schema_fingerprint=self.schema.fingerprint,
            units=self.data.units,
            train_examples=self.data.train_examples,
            holdout_examples=self.data.holdout_examples,
            moments=self.data.moments,
            versions=dict(self._versions),
        )

    def _refuse(self, code: str, message: str) -> SiteCallError:
        return SiteCallError(self.site_id, code, message)

    def _load(self, schema_fingerprint: str, weights: Mapping) -> None:
        if schema_fingerprint != self.schema.fingerprint:
            raise self._refuse(
                "FAILED_PRECONDITION",
                f"the federation's schema {schema_fingerprint} is not this site's "
                f"{self.schema.fingerprint}",
            )
        try:
            load_weights_into(self._model, weights)
        except InvalidWeights as exc:
            raise self._refuse("INVALID_ARGUMENT", f"incompatible model: {exc}") from None

    def train(
        self,
        round_key: str,
        schema_fingerprint: str,
        config: TrainConfig,
        weights: Mapping,
        timeout: float | None = None,
    ) -> SiteUpdate:
        if config.local_epochs < 0 or config.batch_size < 1 or not config.learning_rate > 0:
            raise self._refuse("INVALID_ARGUMENT", f"unusable training config {config}")
        if not self.data.train_examples:
            raise self._refuse("FAILED_PRECONDITION", "this site has no training examples")
        with self._lock:
            self._load(schema_fingerprint, weights)
            started = time.perf_counter()
            try:
                steps, metrics = train_local(self.task, self._model, self.data.train, config)
            except ValueError as exc:
                raise self._refuse("INVALID_ARGUMENT", str(exc)) from None
            seconds = time.perf_counter() - started
            update = weights_of(self._model)
        self._journal(
            "train", round_key, examples=self.data.train_examples, steps=steps, seconds=seconds
        )
        return SiteUpdate(
            site_id=self.site_id,
            round_key=round_key,
            weights=update,
            num_examples=self.data.train_examples,
            steps=steps,
            metrics=metrics,
            train_seconds=seconds,
        )

    def evaluate(
        self,
        round_key: str,
        schema_fingerprint: str,
        weights: Mapping,
        timeout: float | None = None,
    ) -> SiteEvaluation:
        with self._lock:
            self._load(schema_fingerprint, weights)
            started = time.perf_counter()
            statistics = evaluate(self.task, self._model, self.data.holdout)
            seconds = time.perf_counter() - started
        self._journal("evaluate", round_key, examples=self.data.holdout_examples, seconds=seconds)
        return SiteEvaluation(
            site_id=self.site_id,
            round_key=round_key,
            num_examples=self.data.holdout_examples,
            statistics=statistics,
            eval_seconds=seconds,
        )

    def _journal(self, kind: str, round_key: str, **facts: float) -> None:
        """Append what the site did (never what its data holds) to its local journal."""
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        entry = {"at": time.time(), "kind": kind, "round": round_key, **facts}
        with open(self.state_dir / "journal.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
