"""GrpcSite: the `Site` port over a gRPC channel to one site worker.

Every call has a deadline. gRPC errors and malformed replies become SiteCallError, which the
orchestrator's fan-out turns into a SiteFailure value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc

from twin_core.dispatch import ReceiveSlots
from twin_core.errors import MalformedStream, SiteCallError
from twin_core.federation import SiteEvaluation, SiteInfo, SiteUpdate, TrainConfig
from twin_core.monitoring import DriftSummary, QualityReport
from twin_core.secagg import AdvertisedKeys, MaskingPlan, RevealedShare, SealedShare
from twin_wire import codec
from twin_wire.v1 import site_pb2 as pb
from twin_wire.v1 import site_pb2_grpc

MiB = 1 << 20
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * MiB),
    ("grpc.max_send_message_length", 16 * MiB),
    # Long local training must not let an idle connection be dropped by a middlebox.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def mutual_tls(tls_dir: Path, site_id: str) -> dict:
    """GrpcSite keyword arguments for mutual TLS to `site_id`: the orchestrator's certificate
    and key and the federation CA from the PKI folder, and the site id as the name the site's
    certificate must carry (checked instead of the dialled host: a site answering with another
    site's certificate fails the handshake)."""
    from twin_wire.pki import ORCHESTRATOR, load

    own = load(Path(tls_dir), ORCHESTRATOR)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=own.ca_pem, private_key=own.key_pem, certificate_chain=own.cert_pem
    )
    return {"credentials": credentials, "options": (("grpc.ssl_target_name_override", site_id),)}


class GrpcSite:
    """One site worker at `target` ("host:port"). The channel opens on first use.

    Opening lazily matters: a channel inherited through fork hangs, so processes that fork
    must create their GrpcSite objects (or at least make their first call) after forking.
    """

    def __init__(
        self,
        site_id: str,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
        interceptors: Sequence[object] = (),
        receive_slots: ReceiveSlots | None = None,
    ) -> None:
        """`receive_slots`: shared by a fleet's clients, bounds how many updates are held in
        memory at once (twin_core.dispatch.ReceiveSlots)."""
        self.site_id = site_id
        self.receive_slots = receive_slots
        self.target = target
        self._credentials = credentials
        self._options = tuple(CHANNEL_OPTIONS) + tuple(options)
        self._interceptors = tuple(interceptors)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: site_pb2_grpc.SiteServiceStub | None = None

    def __repr__(self) -> str:
        return f"GrpcSite({self.site_id!r}, {self.target!r})"

    @property
    def stub(self) -> site_pb2_grpc.SiteServiceStub:
        with self._lock:
            if self._stub is None:
                if self._credentials is None:
                    channel = grpc.insecure_channel(self.target, options=self._options)
                else:
                    channel = grpc.secure_channel(
                        self.target, self._credentials, options=self._options
                    )
                self._channel = channel
                if self._interceptors:
                    channel = grpc.intercept_channel(channel, *self._interceptors)
                self._stub = site_pb2_grpc.SiteServiceStub(channel)
            return self._stub

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def _fail(self, exc: Exception) -> SiteCallError:
        if isinstance(exc, grpc.RpcError):
            return SiteCallError(self.site_id, exc.code().name, exc.details() or "")
        return SiteCallError(self.site_id, "MALFORMED_REPLY", str(exc))

    def info(self, timeout: float) -> SiteInfo:
        try:
            return codec.info_from_proto(
                self.stub.GetInfo(pb.InfoRequest(site_id=self.site_id), timeout=timeout)
            )
        except grpc.RpcError as exc:
            raise self._fail(exc) from None

    def train(
        self,
        round_key: str,
        schema_fingerprint: str,
        config: TrainConfig,
        weights: Mapping,
        timeout: float,
        masking: MaskingPlan | None = None,
    ) -> SiteUpdate:
        requests = codec.train_requests(
            self.site_id, round_key, schema_fingerprint, config, weights, masking
        )
        try:
            replies = self.stub.Train(requests, timeout=timeout)
            update = codec.read_train_replies(self._arriving(replies))
        except (grpc.RpcError, MalformedStream) as exc:
            raise self._fail(exc) from None
        if update.site_id != self.site_id or update.round_key != round_key:
            raise SiteCallError(
                self.site_id,
                "MALFORMED_REPLY",
                f"reply names site {update.site_id!r} round {update.round_key!r}",
            )
        return update

    def _arriving(self, replies: Iterator) -> Iterator:
        """The reply stream; once its first message is in (the site has trained), the update
        takes a receive slot before any more of it is read."""
        for index, reply in enumerate(replies):
            if index == 0 and self.receive_slots is not None:
                self.receive_slots.take()
            yield reply

    def evaluate(
        self, round_key: str, schema_fingerprint: str, weights: Mapping, timeout: float
    ) -> SiteEvaluation:
        requests = codec.evaluate_requests(self.site_id, round_key, schema_fingerprint, weights)
        try:
            return codec.evaluation_from_proto(self.stub.Evaluate(requests, timeout=timeout))
        except grpc.RpcError as exc:
            raise self._fail(exc) from None

    def check_data(self, timeout: float) -> QualityReport:
        request = pb.DataCheckRequest(site_id=self.site_id)
        try:
            return codec.quality_from_proto(self.stub.CheckData(request, timeout=timeout))
        except grpc.RpcError as exc:
            raise self._fail(exc) from None

    def drift(self, timeout: float) -> DriftSummary:
        try:
            reply = self.stub.Drift(pb.DriftRequest(site_id=self.site_id), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._fail(exc) from None
        return codec.drift_from_proto(reply)

    def _secagg(self, request: pb.SecAggRequest, timeout: float) -> pb.SecAggReply:
        try:
            reply = self.stub.SecAgg(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._fail(exc) from None
        if reply.site_id != self.site_id or reply.round_key != request.round_key:
            raise SiteCallError(
                self.site_id,
                "MALFORMED_REPLY",
                f"reply names site {reply.site_id!r} round {reply.round_key!r}",
            )
        return reply

    def secagg_advertise(self, round_key: str, timeout: float) -> AdvertisedKeys:
        request = pb.SecAggRequest(
            site_id=self.site_id, round_key=round_key, advertise=pb.SecAggAdvertise()
        )
        return codec.keys_from_proto(self._secagg(request, timeout).keys)

    def secagg_share(
        self, round_key: str, roster: Sequence[AdvertisedKeys], threshold: int, timeout: float
    ) -> list[SealedShare]:
        request = pb.SecAggRequest(
            site_id=self.site_id,
            round_key=round_key,
            share=pb.SecAggShare(
                roster=[codec.keys_to_proto(k) for k in roster], threshold=threshold
            ),
        )
        return [codec.sealed_from_proto(s) for s in self._secagg(request, timeout).sealed]

    def secagg_unmask(
        self, round_key: str, survivors: Sequence[str], timeout: float
    ) -> list[RevealedShare]:
        request = pb.SecAggRequest(
            site_id=self.site_id,
            round_key=round_key,
            unmask=pb.SecAggUnmask(survivors=list(survivors)),
        )
        return [codec.revealed_from_proto(r) for r in self._secagg(request, timeout).revealed]

    def wait_healthy(self, timeout: float) -> None:
        """Block until the worker's standard health check answers SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        _ = self.stub  # opens the channel
        assert self._channel is not None
        health = health_pb2_grpc.HealthStub(self._channel)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
            raise SiteCallError(
                self.site_id, "UNAVAILABLE", f"not healthy at {self.target}: {exc!r}"
            ) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise SiteCallError(self.site_id, "UNAVAILABLE", f"health status {reply.status}")
