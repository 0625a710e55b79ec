"""Build and run the gRPC server: the site service, the standard health check, graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from site_worker.handler import SiteHandler
from site_worker.servicer import SiteServicer
from twin_wire.pki import ORCHESTRATOR, Credentials
from twin_wire.v1 import site_pb2, site_pb2_grpc

log = logging.getLogger("site_worker")
MiB = 1 << 20
SERVICE_NAME = site_pb2.DESCRIPTOR.services_by_name["SiteService"].full_name
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * MiB),
    ("grpc.max_send_message_length", 16 * MiB),
    # Accept the orchestrator's keepalive pings during long local training.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


class SiteServer:
    """A running site worker: `port` is the bound port (useful when asked for port 0)."""

    def __init__(
        self,
        handlers: Mapping[str, SiteHandler],
        host: str,
        port: int,
        max_workers: int = 8,
        tls: Credentials | None = None,
        allowed_peers: frozenset[str] = frozenset({ORCHESTRATOR}),
        site_tls: list[Credentials] | None = None,
    ):
        """`tls`: the site's certificate, key and the federation CA; the server then speaks
        only mutual TLS and answers only `allowed_peers`. None: insecure (local/dev mode).
        `site_tls`: a worker hosting several virtual sites presents each site's own
        certificate, picked by the name the caller asks for (TLS SNI: the orchestrator dials
        a site by its site id), so each virtual site keeps its own identity."""
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
            options=SERVER_OPTIONS,
        )
        servicer = SiteServicer(handlers, allowed_peers if tls is not None else None)
        site_pb2_grpc.add_SiteServiceServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.secure = tls is not None
        if tls is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            pairs = [(c.key_pem, c.cert_pem) for c in (site_tls or [tls])]
            credentials = grpc.ssl_server_credentials(
                pairs,
                root_certificates=tls.ca_pem,
                require_client_auth=True,
            )
            self.port = self.server.add_secure_port(f"{host}:{port}", credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        self.sites = sorted(handlers)

    def start(self) -> None:
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """Stop taking new calls, let running ones finish for up to `grace` seconds."""
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()


def serve(server: SiteServer, *, grace: float = 30.0, ready_file: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping (grace %.0f s)", signal.Signals(signum).name, grace)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info("serving %s on port %d", ", ".join(server.sites), server.port)
    if ready_file:
        tmp = Path(str(ready_file) + ".tmp")
        tmp.write_text(str(server.port))
        tmp.replace(ready_file)
    stopping.wait()
    server.stop(grace)
    log.info("stopped")
