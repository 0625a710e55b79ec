"""A gRPC client interceptor that keeps every message sent to and received from the sites."""

from __future__ import annotations

import threading

import grpc

from twin_pipelines.resources import GrpcFleet


class MessageLog:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str, object]] = []  # (method, "sent" | "received", message)
        self._lock = threading.Lock()

    def add(self, method: str, direction: str, message: object) -> None:
        with self._lock:
            self.messages.append((method, direction, message))

    def record(self, method: str, direction: str, iterator):
        for message in iterator:
            self.add(method, direction, message)
            yield message


class Recorder(
    grpc.UnaryUnaryClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, log: MessageLog) -> None:
        self.log = log

    def intercept_unary_unary(self, continuation, details, request):
        self.log.add(details.method, "sent", request)
        response = continuation(details, request)
        self.log.add(details.method, "received", response.result())
        return response

    def intercept_stream_unary(self, continuation, details, request_iterator):
        response = continuation(details, self.log.record(details.method, "sent", request_iterator))
        self.log.add(details.method, "received", response.result())
        return response

    def intercept_stream_stream(self, continuation, details, request_iterator):
        responses = continuation(details, self.log.record(details.method, "sent", request_iterator))
        return self.log.record(details.method, "received", responses)


class RecordingFleet(GrpcFleet):
    """The real gRPC fleet, with every message of every call kept in `message_log()`."""

    def message_log(self) -> MessageLog:
        return _LOGS.setdefault(self.endpoints, MessageLog())

    def _connect(self, site_id: str, target: str):
        from twin_wire.client import GrpcSite

        return GrpcSite(
            site_id, target, interceptors=[Recorder(self.message_log())], **self._security(site_id)
        )


_LOGS: dict[str, MessageLog] = {}
