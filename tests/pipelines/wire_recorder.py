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


# ---- the audit: no row of patient data in any captured message -----------------------------
# bytes fields that are uniformly random by construction (weights, ciphertexts, keys, shares):
# a 4-byte data pattern turns up in them by chance, so only 8-byte doubles are looked for there
RANDOM_BYTES = frozenset(
    {
        "data",
        "ciphertext",
        "cipher_public_key",
        "mask_public_key",
        "self_mask_commitment",
        "signature",
        "value",
    }
)


def walk(message, path=""):
    """Yield (field path, descriptor, value) for every set scalar in a message, recursively."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        values = value if field.label == FieldDescriptor.LABEL_REPEATED else [value]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                yield f"{name}[key]", field, key
                yield f"{name}[{key}]", field, item
            continue
        for item in values:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                yield from walk(item, name + ".")
            else:
                yield name, field, item


def site_values(cohort, sites) -> tuple[set[str], list[bytes], list[bytes]]:
    import struct

    import pandas as pd

    ids: set[str] = set()
    doubles: list[bytes] = []
    singles: list[bytes] = []
    for site in sites:
        frame = pd.read_csv(cohort / "sites" / f"{site}.csv")
        ids |= set(frame.patient_id)
        for column in ("y", "bmi", "age"):
            values = frame[column].dropna().unique()
            values = values[values % 1 != 0]  # whole numbers could coincide with counts
            doubles += [struct.pack("<d", v) for v in values]
            singles += [struct.pack("<f", v) for v in values]
    return ids, doubles, singles


def audit_no_rows(log: MessageLog, cohort, sites) -> None:
    """No patient id, and no data value (as a double, or through a float32 tensor), in any
    message the orchestrator sent or received."""
    import struct

    from twin_wire.v1 import site_pb2 as pb

    ids, doubles, singles = site_values(cohort, sites)
    chunk_bytes = bytearray()
    envelope_bytes = bytearray()
    stat_names = None
    for method, direction, message in log.messages:
        raw = message.SerializeToString()
        part = (
            message.WhichOneof("part")
            if hasattr(message, "WhichOneof") and "part" in message.DESCRIPTOR.oneofs_by_name
            else None
        )
        (chunk_bytes if part == "chunk" else envelope_bytes).extend(raw + b"\x00" * 8)
        for name, _, value in walk(message):
            if isinstance(value, str):
                assert value not in ids, f"a patient id travelled in {method} {direction} {name}"
        if isinstance(message, pb.EvaluateReply):
            stat_names = stat_names or set(message.statistics)
            assert set(message.statistics) == stat_names  # a fixed set of named sums per task
    everything = bytes(chunk_bytes + envelope_bytes)
    assert not [i for i in ids if i.encode() in everything]
    assert not [d for d in doubles if d in everything]  # no data value as a double, anywhere
    # nor as a number in any field outside the weights: checked value by value (a 4-byte
    # pattern can turn up by chance inside the many doubles of the statistics)
    as_double = {struct.unpack("<d", d)[0] for d in doubles}
    as_single = {struct.unpack("<f", s)[0] for s in singles}
    for method, direction, message in log.messages:
        for name, field, value in walk(message):
            if isinstance(value, float):
                # a data value as it is, or one that went through a float32 tensor
                single = struct.unpack("<f", struct.pack("<f", value))[0]
                leaked = value in as_double or (single == value and single in as_single)
                assert not leaked, (method, direction, name, value)
            elif isinstance(value, bytes) and field.name not in RANDOM_BYTES:
                assert not [s for s in singles if s in value], (method, direction, name)
