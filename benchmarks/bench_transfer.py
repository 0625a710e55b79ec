"""Benchmark 2: weight transfer throughput over the real gRPC path, in MB/s of model bytes.

The subject is the orchestrator's client (`twin_wire.client.GrpcSite`) calling a real
`site_worker.server.SiteServer` on localhost in this process: the codec's header, 1 MiB
chunks, the site's assembler and SHA-256 check, both ways. The model sent is loaded from a
weights file by the RoundStore, as `round_evaluation` sends the candidate: its SHA-256 is
known from the file (computed once, when it was saved), so it travels in the header and the
sender does not hash it per call. The site's handler does no work (it answers an evaluation at
once, and returns a copy of the weights it received as its update, which, like freshly trained
weights, the site hashes as it streams them back and sends the SHA-256 in the last chunk), so
only the transfer is timed. Two calls:

- send: `GrpcSite.evaluate`, the model one way (client to site);
- round trip: `GrpcSite.train`, the model to the site and the site's update back.

The notes add both calls for a model built in memory (a plain dict: the sender hashes it as it
streams it, the trailer carrying the SHA-256).

The baseline is the same bytes over a bare gRPC channel: a generic handler with no
serialisation, the same 1 MiB chunks, the same channel and server options (message size
limits, keepalive) and the same thread pool; the round-trip baseline receives the whole stream
before it sends it back, as a site does.
"""

from __future__ import annotations

import hashlib
import time
from concurrent import futures

from benchmarks.harness import Result, Target, interleaved, median

ORDER = 2
TITLE = "weight transfer throughput"
TARGET = Target("ratio", ">=", 0.5)
FULL_PARAMS = 10_000_000  # 40 MB of float32
QUICK_PARAMS = 500_000  # 2 MB: two chunks
SERVICE = "twin_bench.Raw"
SITE = "bench-site"


class _EchoHandler:
    """The part of SiteHandler the servicer calls, doing nothing but answer."""

    site_id = SITE

    def evaluate(self, round_key, schema_fingerprint, weights):
        from twin_core.federation import SiteEvaluation

        return SiteEvaluation(SITE, round_key, 1, {"n": 1.0}, 0.0)

    def train(self, round_key, schema_fingerprint, config, weights, masking=None):
        from twin_core.federation import SiteUpdate

        return SiteUpdate(SITE, round_key, dict(weights), 1, 1, {}, 0.0)


def _raw_server(max_workers: int):
    """A bare gRPC server: raw bytes in, raw bytes out, same options as a site worker."""
    import grpc

    from site_worker.server import SERVER_OPTIONS

    def upload(chunks, context):
        total = sum(len(c) for c in chunks)
        return total.to_bytes(8, "little")

    def round_trip(chunks, context):
        received = list(chunks)  # the whole stream first, as a site's Train does
        yield from received

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Upload": grpc.stream_unary_rpc_method_handler(upload),
                    "RoundTrip": grpc.stream_stream_rpc_method_handler(round_trip),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def run(quick: bool) -> list[Result]:
    import tempfile
    from pathlib import Path

    import grpc

    from benchmarks.bench_aggregation import cpu_interleaved, model_of
    from site_worker.server import SiteServer
    from twin_core.federation import TrainConfig
    from twin_core.weights import weights_to_bytes
    from twin_pipelines.resources.store import RoundStore
    from twin_wire.client import CHANNEL_OPTIONS, GrpcSite
    from twin_wire.codec import CHUNK_BYTES

    params = QUICK_PARAMS if quick else FULL_PARAMS
    repeats = 2 if quick else 15
    in_memory = model_of(params, seed=1)
    tmp = tempfile.TemporaryDirectory(prefix="twin-bench-transfer-")
    store = RoundStore(root=tmp.name)
    path, _ = store.save_weights("r0001", "candidate.twt", in_memory, {})
    weights = store.load(Path(path)).weights  # as round_evaluation loads the candidate
    payload = weights_to_bytes(weights)
    nbytes = len(payload)
    config = TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.01, seed=0)

    site_server = SiteServer({SITE: _EchoHandler()}, "127.0.0.1", 0)
    site_server.start()
    raw_server, raw_port = _raw_server(max_workers=8)  # SiteServer's default pool
    site = GrpcSite(SITE, f"127.0.0.1:{site_server.port}")
    channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=CHANNEL_OPTIONS)
    upload = channel.stream_unary(f"/{SERVICE}/Upload")
    round_trip = channel.stream_stream(f"/{SERVICE}/RoundTrip")

    def raw_chunks():
        view = memoryview(payload)
        for start in range(0, nbytes, CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])

    def raw_send() -> None:
        assert int.from_bytes(upload(raw_chunks(), timeout=120), "little") == nbytes

    def raw_round_trip() -> None:
        assert sum(len(c) for c in round_trip(raw_chunks(), timeout=120)) == nbytes

    def send() -> None:
        site.evaluate("r0001", "bench", weights, timeout=120)

    def train() -> dict:
        return site.train("r0001", "bench", config, weights, timeout=120).weights

    def send_in_memory() -> None:
        site.evaluate("r0001", "bench", in_memory, timeout=120)

    def train_in_memory() -> None:
        site.train("r0001", "bench", config, in_memory, timeout=120)

    try:
        site.wait_healthy(timeout=30)
        back = train()  # the update that came back is the model that went out
        assert weights_to_bytes(back) == payload
        send_s, raw_send_s = interleaved(send, raw_send, repeats)
        trip_s, raw_trip_s = interleaved(train, raw_round_trip, repeats)
        cpu_send = cpu_interleaved(send, raw_send, max(2, repeats // 3))
        cpu_trip = cpu_interleaved(train, raw_round_trip, max(2, repeats // 3))
        mem_send_s, mem_raw_send_s = interleaved(send_in_memory, raw_send, max(2, repeats // 3))
        mem_trip_s, mem_raw_trip_s = interleaved(
            train_in_memory, raw_round_trip, max(2, repeats // 3)
        )
    finally:
        site.close()
        channel.close()
        site_server.stop(grace=0)
        raw_server.stop(0).wait()
        tmp.cleanup()

    sha_s = []
    for _ in range(5):
        start = time.perf_counter()
        hashlib.sha256(payload).hexdigest()
        sha_s.append(time.perf_counter() - start)
    sha = (
        f"SHA-256 of the model alone {median(sha_s) * 1e3:.0f} ms (every receiver; a sender "
        "only of a model whose SHA-256 it does not know yet)"
    )

    def mbps(moved: int, seconds: list[float]) -> float:
        return moved / median(seconds) / 1e6

    model = f"{nbytes / 1e6:.0f} MB model" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB model"
    note = f"{model} in {CHUNK_BYTES >> 10} KiB chunks, median of {repeats}"
    return [
        Result(
            f"weight transfer, send {model} (Evaluate)",
            mbps(nbytes, send_s),
            "MB/s",
            TARGET,
            baseline=mbps(nbytes, raw_send_s),
            baseline_label="raw bytes, bare gRPC stream",
            notes=(
                f"{note}; {median(send_s) * 1e3:.0f} ms per call; {sha}; a model built in "
                f"memory (hashed as it streams): {median(mem_send_s) * 1e3:.0f} ms, "
                f"{median(mem_raw_send_s) / median(mem_send_s):.0%} of the raw stream; "
                f"CPU time (both ends, all threads) {cpu_send[0] * 1e3:.0f} ms, raw "
                f"{cpu_send[1] * 1e3:.0f} ms: {cpu_send[1] / cpu_send[0]:.0%}",
            ),
        ),
        Result(
            f"weight transfer, round trip {model} (Train)",
            mbps(2 * nbytes, trip_s),
            "MB/s",
            TARGET,
            baseline=mbps(2 * nbytes, raw_trip_s),
            baseline_label="raw bytes, bare gRPC stream",
            notes=(
                f"{note}; both ways counted; {median(trip_s) * 1e3:.0f} ms per call; a model "
                f"built in memory: {median(mem_trip_s) * 1e3:.0f} ms, "
                f"{median(mem_raw_trip_s) / median(mem_trip_s):.0%} of the raw stream; "
                f"CPU time {cpu_trip[0] * 1e3:.0f} ms, raw {cpu_trip[1] * 1e3:.0f} ms: "
                f"{cpu_trip[1] / cpu_trip[0]:.0%}",
            ),
        ),
    ]
