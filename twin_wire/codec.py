"""The one module that maps protobuf messages to twin_core values and back.

Weights travel as a header (tensor names, dtypes, shapes, total length) followed by the raw
bytes in chunks of at most `CHUNK_BYTES`, so no message comes near gRPC's 4 MiB limit
whatever the model's size. The SHA-256 of the whole stream travels in the header when the
sender already knows it (weights loaded from a checked file or received from a checked
stream: `twin_core.weights.known_manifest`), else in the last chunk (`Chunk.sha256`, the
trailer): the sender hashes each chunk as it sends it instead of hashing the whole model
before the first byte leaves. The receiver hashes each chunk as it arrives and refuses the
weights unless the stream is complete and its SHA-256 is the one the sender declared.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from twin_core.errors import InvalidWeights, MalformedStream
from twin_core.federation import (
    ColumnMoments,
    SiteEvaluation,
    SiteInfo,
    SiteUpdate,
    TrainConfig,
)
from twin_core.monitoring import DriftSummary, ExpectationOutcome, FeatureDrift, QualityReport
from twin_core.secagg import AdvertisedKeys, MaskingPlan, RevealedShare, SealedShare
from twin_core.weights import (
    Manifest,
    TensorSpec,
    VerifiedWeights,
    Weights,
    check_manifest,
    iter_tensor_bytes,
    known_manifest,
    specs_of,
    weights_from_buffer,
)
from twin_wire.v1 import site_pb2 as pb

CHUNK_BYTES = 1 << 20
MAX_STREAM_BYTES = 4 << 30  # refuse a header that asks for more memory than any model needs


# ---- weights -------------------------------------------------------------------------------
def manifest_to_proto(manifest: Manifest) -> pb.WeightsHeader:
    return pb.WeightsHeader(
        tensors=[
            pb.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in manifest.tensors
        ],
        total_bytes=manifest.total_bytes,
        sha256=manifest.sha256,
    )


def manifest_from_proto(header: pb.WeightsHeader) -> Manifest:
    tensors = tuple(TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in header.tensors)
    return Manifest(tensors, header.total_bytes, header.sha256)


def _chunk_data(
    weights: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[int, bytes]]:
    """`(offset, data)` for each chunk of the model's bytes: `chunk_bytes` long but the last;
    small tensors are packed together. A chunk that lies inside one tensor is copied once,
    straight from the tensor's memory."""
    pending = bytearray()
    offset = 0
    for view in iter_tensor_bytes(weights):
        start = 0
        while start < len(view):
            if not pending and len(view) - start >= chunk_bytes:
                yield offset, bytes(view[start : start + chunk_bytes])
                start += chunk_bytes
                offset += chunk_bytes
                continue
            take = min(chunk_bytes - len(pending), len(view) - start)
            pending += view[start : start + take]
            start += take
            if len(pending) == chunk_bytes:
                yield offset, bytes(pending)
                offset += len(pending)
                pending.clear()
    if pending:
        yield offset, bytes(pending)


class _Hasher:
    """SHA-256 of a stream fed piece by piece, computed on a thread of its own (hashlib
    releases the GIL), so that hashing one chunk overlaps receiving and parsing the next."""

    def __init__(self) -> None:
        digest = hashlib.sha256()
        pieces: queue.SimpleQueue = queue.SimpleQueue()

        def run() -> None:
            while (piece := pieces.get()) is not None:
                digest.update(piece)

        self._digest, self._pieces = digest, pieces
        self._thread = threading.Thread(target=run, name="twin-wire-sha256", daemon=True)
        self._thread.start()
        # a stream abandoned half way (refused, cancelled) still ends the thread
        weakref.finalize(self, pieces.put, None)

    def update(self, piece: memoryview) -> None:
        """Queue `piece`, which must not change until `hexdigest` returns."""
        self._pieces.put(piece)

    def hexdigest(self) -> str:
        self._pieces.put(None)
        self._thread.join()
        return self._digest.hexdigest()


def weights_header(weights: Mapping[str, np.ndarray]) -> pb.WeightsHeader:
    """The header for streaming `weights`: its SHA-256 only when already known (else empty,
    and the stream's last chunk carries it: `_stream`)."""
    known = known_manifest(weights)
    if known is not None:
        return manifest_to_proto(known)
    return pb.WeightsHeader(
        tensors=[
            pb.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape))
            for t in specs_of(weights)
        ],
        total_bytes=sum(int(a.nbytes) for a in weights.values()),
    )


def weight_chunks(
    weights: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES, trailer: bool = False
) -> Iterator[pb.Chunk]:
    """The model's bytes as chunks of `chunk_bytes` (small tensors are packed together); with
    `trailer`, the last chunk carries the SHA-256 of them all (one empty chunk if none)."""
    for offset, data, digest in _chunk_parts(weights, chunk_bytes, trailer):
        yield pb.Chunk(offset=offset, data=data, sha256=digest)


def _chunk_parts(
    weights: Mapping[str, np.ndarray], chunk_bytes: int, trailer: bool
) -> Iterator[tuple[int, bytes, str]]:
    """`(offset, data, sha256)`: sha256 empty but on the last chunk, with `trailer`."""
    if not trailer:
        for offset, data in _chunk_data(weights, chunk_bytes):
            yield offset, data, ""
        return
    digest = _Hasher()  # on its own thread: hashing overlaps serialising and sending
    previous = None
    for offset, data in _chunk_data(weights, chunk_bytes):
        digest.update(memoryview(data))
        if previous is not None:
            yield previous[0], previous[1], ""
        previous = (offset, data)
    if previous is None:
        yield 0, b"", digest.hexdigest()
    else:
        yield previous[0], previous[1], digest.hexdigest()


class WeightsAssembler:
    """Receives a chunk stream for a manifest and checks order, length and checksum.

    The checksum is the manifest's SHA-256 when the header carried one, else the one the
    last chunk carries (the trailer). Each chunk is hashed as it arrives, on a thread of its
    own, from the assembled buffer.
    """

    def __init__(self, manifest: Manifest) -> None:
        try:
            check_manifest(manifest)
        except InvalidWeights as exc:
            raise MalformedStream(f"bad weights header: {exc}") from None
        if manifest.total_bytes > MAX_STREAM_BYTES:
            raise MalformedStream(
                f"header declares {manifest.total_bytes} bytes, above the {MAX_STREAM_BYTES} limit"
            )
        self.manifest = manifest
        # np.empty, not bytearray(n): no zero-fill of memory every byte of which the stream
        # overwrites, and numpy asks the kernel for huge pages, so far fewer page faults
        self._buffer = np.empty(manifest.total_bytes, dtype=np.uint8)
        self._view = memoryview(self._buffer)
        self._offset = 0
        self._digest = _Hasher()
        self._declared = manifest.sha256
        self._trailer = ""

    def add(self, chunk: pb.Chunk) -> None:
        if self._trailer:
            raise MalformedStream("a chunk arrived after the chunk that carried the checksum")
        if chunk.offset != self._offset:
            raise MalformedStream(f"chunk at offset {chunk.offset}, expected {self._offset}")
        data = chunk.data  # each read of a bytes field copies it out of the message
        end = self._offset + len(data)
        if end > self.manifest.total_bytes:
            raise MalformedStream(
                f"stream runs past the {self.manifest.total_bytes} bytes its header declares"
            )
        self._view[self._offset : end] = data
        self._digest.update(self._view[self._offset : end])  # written once, never again
        self._offset = end
        if chunk.sha256:
            if self._declared and chunk.sha256 != self._declared:
                raise MalformedStream("the trailer's SHA-256 differs from the header's")
            self._trailer = chunk.sha256

    def finish(self) -> Weights:
        if self._offset != self.manifest.total_bytes:
            raise MalformedStream(
                f"stream ended after {self._offset} of {self.manifest.total_bytes} bytes"
            )
        declared = self._declared or self._trailer
        if not declared:
            raise MalformedStream(
                "stream ended without its SHA-256 (neither in the header nor in a last chunk)"
            )
        digest = self._digest.hexdigest()
        if digest != declared:
            raise MalformedStream("SHA-256 of the received weights does not match the sender's")
        # read-only: the checked manifest stays true of these arrays (known_manifest)
        self._buffer.flags.writeable = False
        manifest = Manifest(self.manifest.tensors, self.manifest.total_bytes, digest)
        return VerifiedWeights(manifest, weights_from_buffer(manifest, self._buffer))


def _stream(message_type: type, header: object, weights: Mapping, weights_header) -> Iterator:
    """A `oneof part {header, chunk}` stream: the header, then the weights' chunks (the last
    one with the SHA-256 unless `weights_header` carries it)."""
    yield message_type(header=header)
    trailer = not weights_header.sha256
    for offset, data, digest in _chunk_parts(weights, CHUNK_BYTES, trailer):
        message = message_type()  # filled in place: `message_type(chunk=...)` copies the chunk
        message.chunk.offset = offset
        message.chunk.data = data
        if digest:
            message.chunk.sha256 = digest
        yield message


def _read_weight_stream(messages: Iterator, header_field: str) -> tuple[object, Weights]:
    """Split a `oneof part {header, chunk}` stream into its header and assembled weights."""
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise MalformedStream("the stream must start with a header")
    header = first.header
    assembler = WeightsAssembler(manifest_from_proto(getattr(header, header_field)))
    for message in messages:
        part = message.WhichOneof("part")
        if part == "header":
            raise MalformedStream("a second header arrived inside the chunk stream")
        if part != "chunk":
            raise MalformedStream("a message in the chunk stream carries neither header nor chunk")
        assembler.add(message.chunk)
    return header, assembler.finish()


# ---- config, info, evaluation ---------------------------------------------------------------
def config_to_proto(config: TrainConfig) -> pb.TrainConfig:
    return pb.TrainConfig(
        local_epochs=config.local_epochs,
        local_steps=config.local_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
        weight_decay=config.weight_decay,
        optimizer=config.optimizer,
        proximal_mu=config.proximal_mu,
        time_budget_s=config.time_budget_s,
        dp_clip=config.dp_clip,
        dpsgd_noise_multiplier=config.dpsgd_noise_multiplier,
        dpsgd_clip=config.dpsgd_clip,
        compression=config.compression,
        topk_fraction=config.topk_fraction,
    )


def config_from_proto(msg: pb.TrainConfig) -> TrainConfig:
    return TrainConfig(
        local_epochs=msg.local_epochs,
        local_steps=msg.local_steps,
        batch_size=msg.batch_size,
        learning_rate=msg.learning_rate,
        seed=msg.seed,
        weight_decay=msg.weight_decay,
        optimizer=msg.optimizer or "adam",
        proximal_mu=msg.proximal_mu,
        time_budget_s=msg.time_budget_s,
        dp_clip=msg.dp_clip,
        dpsgd_noise_multiplier=msg.dpsgd_noise_multiplier,
        dpsgd_clip=msg.dpsgd_clip or 1.0,
        compression=msg.compression or "none",
        topk_fraction=msg.topk_fraction or 0.1,
    )


def info_to_proto(info: SiteInfo) -> pb.SiteInfo:
    return pb.SiteInfo(
        site_id=info.site_id,
        task=info.task,
        schema_json=json.dumps(info.schema, sort_keys=True),
        schema_fingerprint=info.schema_fingerprint,
        units=info.units,
        train_examples=info.train_examples,
        holdout_examples=info.holdout_examples,
        moments=[
            pb.ColumnMoments(column=m.column, count=m.count, sum=m.sum, sum_squares=m.sum_squares)
            for m in info.moments
        ],
        versions=info.versions,
        data_check_passed=info.data_check_passed,
        data_check_score=info.data_check_score,
        data_check_summary=info.data_check_summary,
        drift_known=info.drift is not None,
        dataset_drift=bool(info.drift and info.drift.dataset_drift),
        drifted_share=info.drift.drifted_share if info.drift else 0.0,
        train_units=info.train_units,
    )


def info_from_proto(msg: pb.SiteInfo) -> SiteInfo:
    return SiteInfo(
        site_id=msg.site_id,
        task=msg.task,
        schema=json.loads(msg.schema_json) if msg.schema_json else {},
        schema_fingerprint=msg.schema_fingerprint,
        units=msg.units,
        train_examples=msg.train_examples,
        holdout_examples=msg.holdout_examples,
        moments=tuple(ColumnMoments(m.column, m.count, m.sum, m.sum_squares) for m in msg.moments),
        versions=dict(msg.versions),
        data_check_passed=msg.data_check_passed,
        data_check_score=msg.data_check_score,
        data_check_summary=msg.data_check_summary,
        drift=DriftSummary(msg.site_id, True, msg.drifted_share, msg.dataset_drift, 0.0)
        if msg.drift_known
        else None,
        train_units=msg.train_units,
    )


def evaluation_to_proto(evaluation: SiteEvaluation) -> pb.EvaluateReply:
    return pb.EvaluateReply(
        site_id=evaluation.site_id,
        round_key=evaluation.round_key,
        num_examples=evaluation.num_examples,
        statistics=evaluation.statistics,
        eval_seconds=evaluation.eval_seconds,
    )


def evaluation_from_proto(msg: pb.EvaluateReply) -> SiteEvaluation:
    return SiteEvaluation(
        site_id=msg.site_id,
        round_key=msg.round_key,
        num_examples=msg.num_examples,
        statistics=dict(msg.statistics),
        eval_seconds=msg.eval_seconds,
    )


def quality_to_proto(report: QualityReport) -> pb.DataCheckReply:
    return pb.DataCheckReply(
        site_id=report.site_id,
        success=report.success,
        score=report.score,
        rows=report.rows,
        suite=report.suite,
        outcomes=[
            pb.ExpectationOutcome(
                expectation=o.expectation,
                column=o.column,
                success=o.success,
                unexpected_fraction=o.unexpected_fraction,
            )
            for o in report.outcomes
        ],
    )


def quality_from_proto(msg: pb.DataCheckReply) -> QualityReport:
    return QualityReport(
        site_id=msg.site_id,
        success=msg.success,
        score=msg.score,
        rows=msg.rows,
        suite=msg.suite,
        outcomes=tuple(
            ExpectationOutcome(o.expectation, o.column, o.success, o.unexpected_fraction)
            for o in msg.outcomes
        ),
    )


def drift_to_proto(summary: DriftSummary) -> pb.DriftReply:
    return pb.DriftReply(
        site_id=summary.site_id,
        has_reference=summary.has_reference,
        drifted_share=summary.drifted_share,
        dataset_drift=summary.dataset_drift,
        drift_share_threshold=summary.drift_share_threshold,
        features=[
            pb.FeatureDrift(
                column=f.column,
                score=f.score,
                method=f.method,
                threshold=f.threshold,
                drifted=f.drifted,
            )
            for f in summary.features
        ],
        reference_rows=summary.reference_rows,
        current_rows=summary.current_rows,
        report_html=summary.report_html,
        reference_round=summary.reference_round,
    )


def drift_from_proto(msg: pb.DriftReply) -> DriftSummary:
    return DriftSummary(
        site_id=msg.site_id,
        has_reference=msg.has_reference,
        drifted_share=msg.drifted_share,
        dataset_drift=msg.dataset_drift,
        drift_share_threshold=msg.drift_share_threshold,
        features=tuple(
            FeatureDrift(f.column, f.score, f.method, f.threshold, f.drifted) for f in msg.features
        ),
        reference_rows=msg.reference_rows,
        current_rows=msg.current_rows,
        report_html=msg.report_html,
        reference_round=msg.reference_round,
    )


# ---- train and evaluate streams -----------------------------------------------------------
@dataclass(frozen=True)
class TrainCall:
    site_id: str
    round_key: str
    schema_fingerprint: str
    config: TrainConfig
    weights: Weights
    masking: MaskingPlan | None = None


@dataclass(frozen=True)
class EvaluateCall:
    site_id: str
    round_key: str
    schema_fingerprint: str
    weights: Weights


def train_requests(
    site_id: str,
    round_key: str,
    schema_fingerprint: str,
    config: TrainConfig,
    weights: Mapping,
    masking: MaskingPlan | None = None,
) -> Iterator[pb.TrainRequest]:
    weights_part = weights_header(weights)
    header = pb.TrainHeader(
        site_id=site_id,
        round_key=round_key,
        schema_fingerprint=schema_fingerprint,
        config=config_to_proto(config),
        weights=weights_part,
    )
    if masking is not None:
        header.masking.CopyFrom(masking_to_proto(masking))
    return _stream(pb.TrainRequest, header, weights, weights_part)


def read_train_requests(requests: Iterable[pb.TrainRequest]) -> TrainCall:
    header, weights = _read_weight_stream(iter(requests), "weights")
    return TrainCall(
        header.site_id,
        header.round_key,
        header.schema_fingerprint,
        config_from_proto(header.config),
        weights,
        masking_from_proto(header.masking) if header.HasField("masking") else None,
    )


# ---- secure aggregation -------------------------------------------------------------------
def keys_to_proto(keys: AdvertisedKeys) -> pb.AdvertisedKeys:
    return pb.AdvertisedKeys(
        site_id=keys.site_id,
        cipher_public_key=keys.cipher_public_key,
        mask_public_key=keys.mask_public_key,
        self_mask_commitment=keys.self_mask_commitment,
        signature=keys.signature,
        certificate_pem=keys.certificate_pem,
    )


def keys_from_proto(msg: pb.AdvertisedKeys) -> AdvertisedKeys:
    return AdvertisedKeys(
        msg.site_id,
        msg.cipher_public_key,
        msg.mask_public_key,
        msg.self_mask_commitment,
        msg.signature,
        msg.certificate_pem,
    )


def sealed_to_proto(share: SealedShare) -> pb.SealedShare:
    return pb.SealedShare(
        from_site=share.from_site, to_site=share.to_site, ciphertext=share.ciphertext
    )


def sealed_from_proto(msg: pb.SealedShare) -> SealedShare:
    return SealedShare(msg.from_site, msg.to_site, msg.ciphertext)


def revealed_to_proto(share: RevealedShare) -> pb.RevealedShare:
    return pb.RevealedShare(
        holder=share.holder,
        owner=share.owner,
        kind=share.kind,
        index=share.index,
        value=share.value,
    )


def revealed_from_proto(msg: pb.RevealedShare) -> RevealedShare:
    return RevealedShare(msg.holder, msg.owner, msg.kind, msg.index, msg.value)


def masking_to_proto(plan: MaskingPlan) -> pb.MaskingPlan:
    return pb.MaskingPlan(
        shared=list(plan.shared),
        incoming=[sealed_to_proto(s) for s in plan.incoming],
        weighting=plan.weighting,
    )


def masking_from_proto(msg: pb.MaskingPlan) -> MaskingPlan:
    return MaskingPlan(
        tuple(msg.shared),
        tuple(sealed_from_proto(s) for s in msg.incoming),
        msg.weighting or "examples",
    )


def train_replies(update: SiteUpdate) -> Iterator[pb.TrainReply]:
    header = pb.UpdateHeader(
        site_id=update.site_id,
        round_key=update.round_key,
        num_examples=update.num_examples,
        steps=update.steps,
        metrics=update.metrics,
        train_seconds=update.train_seconds,
        weights=weights_header(update.weights),
    )
    return _stream(pb.TrainReply, header, update.weights, header.weights)


def read_train_replies(replies: Iterable[pb.TrainReply]) -> SiteUpdate:
    header, weights = _read_weight_stream(iter(replies), "weights")
    return SiteUpdate(
        site_id=header.site_id,
        round_key=header.round_key,
        weights=weights,
        num_examples=header.num_examples,
        steps=header.steps,
        metrics=dict(header.metrics),
        train_seconds=header.train_seconds,
    )


def evaluate_requests(
    site_id: str, round_key: str, schema_fingerprint: str, weights: Mapping
) -> Iterator[pb.EvaluateRequest]:
    header = pb.EvaluateHeader(
        site_id=site_id,
        round_key=round_key,
        schema_fingerprint=schema_fingerprint,
        weights=weights_header(weights),
    )
    return _stream(pb.EvaluateRequest, header, weights, header.weights)


def read_evaluate_requests(requests: Iterable[pb.EvaluateRequest]) -> EvaluateCall:
    header, weights = _read_weight_stream(iter(requests), "weights")
    return EvaluateCall(header.site_id, header.round_key, header.schema_fingerprint, weights)
