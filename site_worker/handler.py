"""SiteHandler: one site's data and model work, in plain Python (the `Site` port).

The gRPC servicer decodes requests and calls this; tests and in-process simulations call it
directly. Refusals are SiteCallError with a gRPC status name as the code.
"""

from __future__ import annotations

import json
import logging
import platform
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from twin_core import scaffold
from twin_core.errors import InvalidWeights, SchemaError, SiteCallError, SiteDataError
from twin_core.federation import SiteEvaluation, SiteInfo, SiteUpdate, TrainConfig
from twin_core.monitoring import DriftSummary, ExpectationOutcome, QualityReport
from twin_core.oracle import Oracle
from twin_core.schema import DataSchema
from twin_core.secagg import (
    MASKED,
    AdvertisedKeys,
    MaskingPlan,
    RevealedShare,
    SealedShare,
    SecAggError,
    SiteSession,
)
from twin_core.tasks import task_for
from twin_core.training import evaluate, load_weights_into, train_local, weights_of

PROTOCOL = "twin_wire.v1"
log = logging.getLogger("site_worker")


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


class DataSource(Protocol):
    def version(self) -> object: ...

    def load(self) -> tuple[DataSchema, pd.DataFrame]: ...


class SiteHandler:
    """Holds a site's prepared data; trains and evaluates models sent to it, one at a time.

    With a `source`, the data is re-read whenever the source changes (a hospital's extract
    grows): the data check and the drift report then describe the data as it is now. A new
    extract that no longer loads keeps the previous data and fails the data check, so the site
    stops training until it is fixed.
    """

    def __init__(
        self,
        site_id: str,
        schema: DataSchema,
        frame: pd.DataFrame,
        *,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        state_dir: Path | None = None,
        source: DataSource | None = None,
        drift_window_days: float | None = None,
        drift_share: float = 0.5,
        share_drift_report: bool = False,
        oracle: Oracle | None = None,
        identity: object | None = None,
    ) -> None:
        self.site_id = site_id
        # mutual TLS mode: the site's certificate, key and the federation CA (twin_wire.pki
        # Credentials); secure aggregation signs its keys with them and checks its peers'
        self.identity = identity
        self._secagg: dict[str, SiteSession] = {}
        self.oracle = oracle  # the synthetic cohort's truth: evaluation only, never training
        self.holdout_fraction, self.split_seed = holdout_fraction, split_seed
        self.state_dir = Path(state_dir) if state_dir else None
        self.source = source
        self.drift_window_days, self.drift_share = drift_window_days, drift_share
        self.share_drift_report = share_drift_report
        self._lock = threading.RLock()
        self._versions = software_versions()
        self._source_version = source.version() if source else None
        self._load_error = ""
        self._use(schema, frame)
        self._reference, self._reference_round = self._read_reference()
        self._last_drift: DriftSummary | None = None
        self._control: dict | None = None  # SCAFFOLD c_i, kept between rounds
        self._residual: dict | None = None  # compression's error feedback (_compressed_update)

    @classmethod
    def from_source(cls, site_id: str, source: DataSource, **options) -> SiteHandler:
        schema, frame = source.load()
        return cls(site_id, schema, frame, source=source, **options)

    def _use(self, schema: DataSchema, frame: pd.DataFrame) -> None:
        self.schema, self.frame = schema, frame
        self.task = task_for(schema, self.oracle)
        self.data = self.task.prepare(frame, self.holdout_fraction, self.split_seed)
        self._model = self.task.build_model({}, seed=0)
        self._quality: QualityReport | None = None

    def _refresh(self) -> None:
        """Re-read the source if it changed since the data in use was loaded."""
        if self.source is None:
            return
        version = self.source.version()
        if version == self._source_version:
            return
        self._source_version = version
        try:
            schema, frame = self.source.load()
        except (SchemaError, SiteDataError) as exc:
            self._load_error = str(exc)
            log.error(
                "site %s: new data does not load, keeping the previous data: %s", self.site_id, exc
            )
            return
        self._load_error = ""
        self._use(schema, frame)
        log.info("site %s: data reloaded (%d rows)", self.site_id, len(frame))

    def warm_up(self) -> None:
        """Run one training step on a throwaway copy so the first real round is not slow."""
        if not self.data.train_examples:
            return
        model = self.task.build_model({}, seed=0)
        batch = tuple(t[:8] for t in self.data.train.tensors)
        self.task.loss(model, batch).backward()
        evaluate(self.task, model, self.data.holdout)

    def info(self, timeout: float | None = None) -> SiteInfo:
        with self._lock:
            quality = self.check_data()
        return SiteInfo(
            site_id=self.site_id,
            task=self.task.name,
            schema=self.schema.document,
            schema_fingerprint=self.schema.fingerprint,
            units=self.data.units,
            train_examples=self.data.train_examples,
            holdout_examples=self.data.holdout_examples,
            train_units=self.train_units,
            moments=self.data.moments,
            versions=dict(self._versions),
            data_check_passed=quality.success,
            data_check_score=quality.score,
            data_check_summary=quality.summary(),
            drift=self._last_drift,
        )

    @property
    def train_units(self) -> int:
        """Patients with training rows (the unit DP-SGD samples; rows where a row is a unit)."""
        units = getattr(self.data.train, "units", None)
        if units is None:
            return int(self.data.train_examples)
        return int(len(torch.unique(units)))

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
        masking: MaskingPlan | None = None,
    ) -> SiteUpdate:
        """Train from `weights`; return the trained weights, or under secure aggregation
        (`masking`) only the masked, weighted update. With `config.dp_clip` the update
        (trained minus start) is clipped to that L2 norm before it leaves."""
        if (
            min(config.local_epochs, config.local_steps) < 0
            or config.batch_size < 1
            or not config.learning_rate > 0
        ):
            raise self._refuse("INVALID_ARGUMENT", f"unusable training config {config}")
        self._check_compression(config, masking)
        with self._lock:
            quality = self.check_data()
            if not quality.success:
                raise self._refuse("FAILED_PRECONDITION", f"data check failed: {quality.summary()}")
            if not self.data.train_examples:
                raise self._refuse("FAILED_PRECONDITION", "this site has no training examples")
            model_weights, server_control = scaffold.split(weights, scaffold.CONTROL)
            self._load(schema_fingerprint, model_weights)
            correction, site_control = None, None
            if masking is not None:
                session = self._session(round_key, create=False)
                if server_control:
                    raise self._refuse("INVALID_ARGUMENT", "SCAFFOLD cannot run masked")
            if server_control:
                if config.optimizer != "sgd":
                    raise self._refuse("INVALID_ARGUMENT", "SCAFFOLD needs plain SGD at the site")
                site_control = self._site_control(server_control)
                correction = {k: server_control[k] - site_control[k] for k in server_control}
            started = time.perf_counter()
            try:
                steps, metrics = train_local(
                    self.task,
                    self._model,
                    self.data.train,
                    config,
                    correction,
                    # DP-SGD's sampling and noise from a fresh secret of this site's: seeded
                    # by config.seed alone, the orchestrator (which picks it) could subtract
                    # the noise. (So DP-SGD rounds are not bit-reproducible, by design.)
                    dp_secret=secrets.token_bytes(32),
                )
            except ValueError as exc:
                raise self._refuse("INVALID_ARGUMENT", str(exc)) from None
            seconds = time.perf_counter() - started
            update = weights_of(self._model)
            if site_control is not None:
                new_control = scaffold.new_site_control(
                    site_control,
                    server_control,
                    model_weights,
                    update,
                    steps,
                    config.learning_rate,
                )
                self._keep_site_control(new_control)
                delta = {k: new_control[k] - site_control[k] for k in new_control}
                update = scaffold.join(update, delta, scaffold.DELTA)
            if config.dp_clip > 0 or masking is not None:
                update, metrics = self._private_update(
                    model_weights, update, config, masking, steps, metrics
                )
                if masking is not None:
                    update = {MASKED: self._mask(session, masking, update)}
            if config.compression != "none":
                if server_control:
                    raise self._refuse("INVALID_ARGUMENT", "SCAFFOLD cannot run compressed")
                update, metrics = self._compressed_update(
                    round_key, model_weights, update, config, metrics
                )
            self._keep_reference(round_key)
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

    def _private_update(self, start, trained, config, masking, steps, metrics):
        """The update that may leave: clipped to `dp_clip` (DP-FedAvg), and under secure
        aggregation the weighted delta (what is summed), else start + the clipped delta."""
        from twin_core.privacy import clip_update
        from twin_core.secure_round import masking_weight

        delta = {
            k: np.asarray(trained[k], np.float64) - np.asarray(start[k], np.float64)
            for k in trained
            if trained[k].dtype.kind == "f"
        }
        metrics = dict(metrics)
        if config.dp_clip > 0:
            delta, _ = clip_update(delta, config.dp_clip)
            metrics["dp_clip"] = config.dp_clip
        if masking is not None:
            weight = masking_weight(self.data.train_examples, steps, config, masking.weighting)
            return {k: delta[k] * weight for k in delta}, metrics
        out = dict(trained)
        for k, d in delta.items():
            out[k] = (np.asarray(start[k], np.float64) + d).astype(trained[k].dtype)
        return out, metrics

    # -- update compression (twin_core/compression.py) ------------------------------------------
    def _check_compression(self, config: TrainConfig, masking: MaskingPlan | None) -> None:
        from twin_core.compression import METHODS

        if config.compression not in METHODS:
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"unknown compression {config.compression!r} (choose {', '.join(METHODS)})",
            )
        if config.compression == "none":
            return
        if not 0 < config.topk_fraction <= 1:
            raise self._refuse(
                "INVALID_ARGUMENT", f"topk_fraction must be in (0, 1], got {config.topk_fraction}"
            )
        if masking is not None:
            raise self._refuse(
                "INVALID_ARGUMENT",
                "compression cannot run under secure aggregation (the masked sum needs the full "
                "update)",
            )

    def _compressed_update(self, round_key, start, trained, config, metrics):
        """The update as a compressed payload. The residual it did not send is kept (and in
        `state_dir`, if any, so a restarted worker keeps it) and added to the next update.

        The residual is keyed by the schema and the model's tensor specs: a new model shape or
        schema starts from zero. The residual this round started from is kept beside it, so a
        re-executed round (same round key) encodes from the same residual again instead of
        counting the first attempt's as sent."""
        from twin_core.compression import encode_update

        key = self._residual_key(start)
        state = self._residual_state()
        carried = None
        if state is not None and state["key"] == key:
            carried = state["before"] if state["round"] == round_key else state["after"]
        try:
            payload, residual = encode_update(
                trained,
                start,
                config.compression,
                carried,
                config.topk_fraction,
                max_norm=config.dp_clip if config.dp_clip > 0 else None,
            )
        except ValueError as exc:
            raise self._refuse("INVALID_ARGUMENT", f"compression: {exc}") from None
        self._keep_residual(
            {"key": key, "round": round_key, "before": dict(carried or {}), "after": residual}
        )
        metrics = dict(metrics)
        metrics["compression_residual_norm"] = float(
            np.sqrt(sum(float(np.dot(r.ravel(), r.ravel())) for r in residual.values()))
        )
        return payload, metrics

    def forget_residual(self) -> None:
        """Drop compression's error-feedback residual (memory and state_dir): the next
        compressed update starts from zero, as after a change of model."""
        with self._lock:
            self._residual = None
            path = self._residual_path()
            if path is not None:
                path.unlink(missing_ok=True)

    def _residual_key(self, start: Mapping) -> str:
        import hashlib

        specs = [[n, str(a.dtype), list(a.shape)] for n, a in start.items()]
        doc = json.dumps([self.schema.fingerprint, specs])
        return hashlib.sha256(doc.encode()).hexdigest()

    def _residual_path(self) -> Path | None:
        return self.state_dir / "compression_residual.twt" if self.state_dir else None

    def _residual_state(self) -> dict | None:
        """The kept residual: in memory, else as an earlier run of this worker left it."""
        from twin_core.weights import load_weights

        path = self._residual_path()
        if self._residual is None and path is not None and path.exists():
            try:
                stored = load_weights(path)
            except InvalidWeights as exc:
                log.warning(
                    "site %s: compression residual unreadable, dropped: %s", self.site_id, exc
                )
                return None
            parts: dict[str, dict] = {"before": {}, "after": {}}
            for name, value in stored.weights.items():
                part, _, tensor = name.partition("/")
                parts.setdefault(part, {})[tensor] = np.array(value)
            self._residual = {
                "key": stored.meta.get("key", ""),
                "round": stored.meta.get("round", ""),
                "before": parts["before"],
                "after": parts["after"],
            }
        return self._residual

    def _keep_residual(self, state: dict) -> None:
        from twin_core.weights import save_weights

        self._residual = state
        path = self._residual_path()
        if path is not None:
            both = {
                f"{part}/{name}": v
                for part in ("before", "after")
                for name, v in state[part].items()
            }
            save_weights(path, both, {"key": state["key"], "round": state["round"]})

    def _mask(self, session: SiteSession, masking: MaskingPlan, weighted: Mapping) -> np.ndarray:
        from twin_core import secagg

        try:
            return session.mask(masking, secagg.encode(weighted))
        except SecAggError as exc:
            raise self._refuse("FAILED_PRECONDITION", f"secure aggregation: {exc}") from None

    # -- secure aggregation: this site's side of each step (twin_core/secagg.py) ------------------
    def _session(self, round_key: str, create: bool) -> SiteSession:
        with self._lock:
            session = self._secagg.get(round_key)
            # advertising always starts afresh: a re-executed round gets new keys and seeds,
            # and whatever an earlier attempt left unfinished is dropped, never reused
            if create:
                self._secagg.pop(round_key, None)
                signer = ca = None
                if self.identity is not None:
                    signer = (self.identity.cert_pem, self.identity.key_pem)
                    ca = self.identity.ca_pem
                session = SiteSession(self.site_id, round_key, signer=signer, ca_pem=ca)
                self._secagg[round_key] = session
                for old in list(self._secagg)[:-4]:  # a few rounds in flight at most
                    del self._secagg[old]
            if session is None:
                raise self._refuse(
                    "FAILED_PRECONDITION",
                    f"secure aggregation: no keys advertised for round {round_key}",
                )
            return session

    def secagg_advertise(self, round_key: str, timeout: float | None = None) -> AdvertisedKeys:
        try:
            return self._session(round_key, create=True).advertise()
        except SecAggError as exc:
            raise self._refuse("FAILED_PRECONDITION", f"secure aggregation: {exc}") from None

    def secagg_share(
        self,
        round_key: str,
        roster: list[AdvertisedKeys],
        threshold: int,
        timeout: float | None = None,
    ) -> list[SealedShare]:
        try:
            return self._session(round_key, create=False).share(roster, threshold)
        except SecAggError as exc:
            raise self._refuse("FAILED_PRECONDITION", f"secure aggregation: {exc}") from None

    def secagg_unmask(
        self, round_key: str, survivors: list[str], timeout: float | None = None
    ) -> list[RevealedShare]:
        try:
            revealed = self._session(round_key, create=False).unmask(survivors)
        except SecAggError as exc:
            raise self._refuse("FAILED_PRECONDITION", f"secure aggregation: {exc}") from None
        with self._lock:
            self._secagg.pop(round_key, None)  # the round's secrets are spent
        return revealed

    def evaluate(
        self,
        round_key: str,
        schema_fingerprint: str,
        weights: Mapping,
        timeout: float | None = None,
    ) -> SiteEvaluation:
        with self._lock:
            self._refresh()
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

    def check_data(self, timeout: float | None = None) -> QualityReport:
        """The Great Expectations check of the data in use (cached until the data changes)."""
        from site_worker.quality import check_data

        with self._lock:
            self._refresh()
            if self._quality is None:
                self._quality = check_data(self.site_id, self.schema, self.frame)
            report = self._quality
            if self._load_error:
                unloadable = ExpectationOutcome("data_file_loads", "", False, 1.0)
                report = replace(
                    report,
                    success=False,
                    outcomes=(unloadable, *report.outcomes),
                    score=report.score * len(report.outcomes) / (len(report.outcomes) + 1),
                )
            return report

    def drift(self, timeout: float | None = None) -> DriftSummary:
        """Evidently drift of the current window against the data of the last round trained."""
        from site_worker.drift import drift_summary, unit_table, window

        with self._lock:
            self._refresh()
            current = window(
                self.schema, unit_table(self.schema, self.frame), days=self.drift_window_days
            )
            reference = self._reference
        summary = drift_summary(
            self.site_id,
            self.schema,
            reference,
            current,
            drift_share=self.drift_share,
            # the full report is always kept at the site; it leaves only if the site allows it
            share_report=self.share_drift_report or self.state_dir is not None,
        )
        if self.state_dir is not None and summary.report_html:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.state_dir / "drift_report.html").write_bytes(summary.report_html)
        shared = summary.report_html if self.share_drift_report else b""
        summary = replace(summary, reference_round=self._reference_round, report_html=shared)
        self._last_drift = summary
        return summary

    def _site_control(self, server_control: Mapping) -> dict:
        """This site's SCAFFOLD control variate c_i (zeros until it first trains with SCAFFOLD)."""
        from twin_core.weights import load_weights

        path = self.state_dir / "scaffold_control.twt" if self.state_dir else None
        stored = (
            self._control
            if self._control is not None
            else (dict(load_weights(path).weights) if path is not None and path.exists() else None)
        )
        shapes_match = stored is not None and all(
            k in stored and stored[k].shape == v.shape for k, v in server_control.items()
        )
        return (
            stored
            if shapes_match
            else {k: np.zeros(v.shape, np.float32) for k, v in server_control.items()}
        )

    def _keep_site_control(self, control: dict) -> None:
        from twin_core.weights import save_weights

        self._control = control
        if self.state_dir is not None:
            save_weights(self.state_dir / "scaffold_control.twt", control)

    def _keep_reference(self, round_key: str) -> None:
        """Remember the data this round trained on: the reference window for drift."""
        from site_worker.drift import unit_table

        self._reference = unit_table(self.schema, self.frame)
        self._reference_round = round_key
        self._last_drift = None  # a new reference: earlier drift no longer describes it
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_dir / "reference.parquet.tmp"
            self._reference.to_parquet(tmp, index=False)
            tmp.replace(self.state_dir / "reference.parquet")
            (self.state_dir / "reference_round").write_text(round_key)

    def _read_reference(self) -> tuple[pd.DataFrame | None, str]:
        """The reference window kept by an earlier run of this worker, if it still fits."""
        if self.state_dir is None or not (self.state_dir / "reference.parquet").exists():
            return None, ""
        reference = pd.read_parquet(self.state_dir / "reference.parquet")
        if not set(reference.columns) >= {f.name for f in self.schema.features}:
            return None, ""
        marker = self.state_dir / "reference_round"
        return reference, marker.read_text() if marker.exists() else ""

    def _journal(self, kind: str, round_key: str, **facts: float) -> None:
        """Append what the site did (never what its data holds) to its local journal."""
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        entry = {"at": time.time(), "kind": kind, "round": round_key, **facts}
        with open(self.state_dir / "journal.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
