"""The gRPC face of a site worker: decode, call the handler, encode; errors become statuses."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping

import grpc

from site_worker.handler import SiteHandler
from twin_core.errors import MalformedStream, SiteCallError
from twin_wire import codec
from twin_wire.v1 import site_pb2 as pb
from twin_wire.v1 import site_pb2_grpc

log = logging.getLogger("site_worker")


class SiteServicer(site_pb2_grpc.SiteServiceServicer):
    """Serves one or more sites (a hospital, or many virtual sites in a simulation)."""

    def __init__(
        self, handlers: Mapping[str, SiteHandler], allowed_peers: frozenset[str] | None = None
    ) -> None:
        self.handlers = dict(handlers)
        # with mutual TLS: the identities (certificate names) allowed to call; None in dev mode
        self.allowed_peers = allowed_peers

    def _authorise(self, context: grpc.ServicerContext) -> None:
        """mTLS proves only that the federation's CA issued the caller's certificate; the
        caller must also be the orchestrator (its certificate's name on the allow-list)."""
        if self.allowed_peers is None:
            return
        names = {n.decode(errors="replace") for n in (context.peer_identities() or ())}
        if not names & self.allowed_peers:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {sorted(names) or 'without a certificate'} is not allowed: "
                f"this site answers only {sorted(self.allowed_peers)}",
            )

    def _handler(self, site_id: str, context: grpc.ServicerContext) -> SiteHandler:
        self._authorise(context)
        handler = self.handlers.get(site_id)
        if handler is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown site {site_id!r}: this worker serves {sorted(self.handlers)}",
            )
        return handler

    def _peek_site(
        self, requests: Iterator, context: grpc.ServicerContext
    ) -> tuple[SiteHandler, Iterator]:
        """Check the header's site before the weight chunks are read."""
        first = next(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "malformed chunk stream: no header first"
            )
        return self._handler(first.header.site_id, context), itertools.chain([first], requests)

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, MalformedStream):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed chunk stream: {exc}")
        assert isinstance(exc, SiteCallError)
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        context.abort(code, exc.message)

    def GetInfo(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.SiteInfo:
        return codec.info_to_proto(self._handler(request.site_id, context).info())

    def CheckData(
        self, request: pb.DataCheckRequest, context: grpc.ServicerContext
    ) -> pb.DataCheckReply:
        return codec.quality_to_proto(self._handler(request.site_id, context).check_data())

    def Drift(self, request: pb.DriftRequest, context: grpc.ServicerContext) -> pb.DriftReply:
        return codec.drift_to_proto(self._handler(request.site_id, context).drift())

    def Train(
        self, request_iterator: Iterator[pb.TrainRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TrainReply]:
        handler, requests = self._peek_site(request_iterator, context)
        try:
            call = codec.read_train_requests(requests)
            log.info("train start site=%s round=%s", call.site_id, call.round_key)
            update = handler.train(
                call.round_key,
                call.schema_fingerprint,
                call.config,
                call.weights,
                masking=call.masking,
            )
        except (MalformedStream, SiteCallError) as exc:
            log.warning("train refused site=%s: %s", handler.site_id, exc)
            self._abort(context, exc)
        log.info(
            "train done site=%s round=%s steps=%d %.2fs",
            update.site_id,
            update.round_key,
            update.steps,
            update.train_seconds,
        )
        yield from codec.train_replies(update)

    def SecAgg(self, request: pb.SecAggRequest, context: grpc.ServicerContext) -> pb.SecAggReply:
        handler = self._handler(request.site_id, context)
        reply = pb.SecAggReply(site_id=handler.site_id, round_key=request.round_key)
        step = request.WhichOneof("step")
        try:
            if step == "advertise":
                reply.keys.CopyFrom(
                    codec.keys_to_proto(handler.secagg_advertise(request.round_key))
                )
            elif step == "share":
                roster = [codec.keys_from_proto(k) for k in request.share.roster]
                sealed = handler.secagg_share(request.round_key, roster, request.share.threshold)
                reply.sealed.extend(codec.sealed_to_proto(s) for s in sealed)
            elif step == "unmask":
                revealed = handler.secagg_unmask(request.round_key, list(request.unmask.survivors))
                reply.revealed.extend(codec.revealed_to_proto(r) for r in revealed)
            else:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "secure aggregation: no step")
        except SiteCallError as exc:
            log.warning("secagg %s refused site=%s: %s", step, handler.site_id, exc)
            self._abort(context, exc)
        return reply

    def Evaluate(
        self, request_iterator: Iterator[pb.EvaluateRequest], context: grpc.ServicerContext
    ) -> pb.EvaluateReply:
        handler, requests = self._peek_site(request_iterator, context)
        try:
            call = codec.read_evaluate_requests(requests)
            evaluation = handler.evaluate(call.round_key, call.schema_fingerprint, call.weights)
        except (MalformedStream, SiteCallError) as exc:
            log.warning("evaluate refused site=%s: %s", handler.site_id, exc)
            self._abort(context, exc)
        return codec.evaluation_to_proto(evaluation)
