"""Model weights as plain values: ordered named numpy arrays, their byte layout and files.

The byte layout is the one the wire uses: each tensor's raw little-endian bytes in C order,
concatenated in manifest order, with a SHA-256 over the whole. No pickle anywhere, so loading
weights from a site or from disk never executes code.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twin_core.errors import InvalidWeights

Weights = dict[str, np.ndarray]

_FILE_MAGIC = b"TWINWTS1"
_ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint64", "bool"}
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class Manifest:
    """The layout of a weight byte stream: its tensors, total length and checksum."""

    tensors: tuple[TensorSpec, ...]
    total_bytes: int
    sha256: str

    def as_json(self) -> dict:
        return {
            "tensors": [[t.name, t.dtype, list(t.shape)] for t in self.tensors],
            "total_bytes": self.total_bytes,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, doc: Mapping) -> Manifest:
        specs = tuple(
            TensorSpec(n, d, tuple(int(s) for s in shape)) for n, d, shape in doc["tensors"]
        )
        return cls(specs, int(doc["total_bytes"]), str(doc["sha256"]))


def specs_of(weights: Mapping[str, np.ndarray]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, a.dtype.name, tuple(a.shape)) for n, a in weights.items())


def _contiguous_le(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def iter_tensor_bytes(weights: Mapping[str, np.ndarray]) -> Iterator[memoryview]:
    """Yield each tensor's bytes without copying the model into one buffer."""
    for array in weights.values():
        # reshape(-1) first: memoryview cannot cast a view with a zero in its shape
        yield memoryview(_contiguous_le(array).reshape(-1).view(np.uint8))


def manifest_of(weights: Mapping[str, np.ndarray]) -> Manifest:
    digest = hashlib.sha256()
    total = 0
    for view in iter_tensor_bytes(weights):
        digest.update(view)
        total += view.nbytes
    return Manifest(specs_of(weights), total, digest.hexdigest())


def check_manifest(manifest: Manifest) -> None:
    """Refuse a manifest whose specs are not a plausible layout for its byte count."""
    names = [t.name for t in manifest.tensors]
    if len(set(names)) != len(names):
        raise InvalidWeights("duplicate tensor names in manifest")
    for t in manifest.tensors:
        if t.dtype not in _ALLOWED_DTYPES:
            raise InvalidWeights(f"tensor {t.name!r} has unsupported dtype {t.dtype!r}")
        if any(s < 0 for s in t.shape):
            raise InvalidWeights(f"tensor {t.name!r} has a negative dimension {t.shape}")
    expected = sum(t.nbytes for t in manifest.tensors)
    if expected != manifest.total_bytes:
        raise InvalidWeights(
            f"manifest says {manifest.total_bytes} bytes but its tensors need {expected}"
        )


def weights_from_buffer(manifest: Manifest, buffer: bytes | bytearray | memoryview) -> Weights:
    """Split a byte stream into named arrays (views into `buffer`, no copy)."""
    check_manifest(manifest)
    if len(buffer) != manifest.total_bytes:
        raise InvalidWeights(f"expected {manifest.total_bytes} bytes, got {len(buffer)}")
    out: Weights = {}
    offset = 0
    for t in manifest.tensors:
        count = math.prod(t.shape)
        dtype = np.dtype(t.dtype).newbyteorder("<")
        out[t.name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(
            t.shape
        )
        offset += t.nbytes
    return out


def weights_to_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    return b"".join(bytes(v) for v in iter_tensor_bytes(weights))


def save_weights(
    path: Path, weights: Mapping[str, np.ndarray], meta: Mapping | None = None
) -> Manifest:
    """Write weights (and small JSON metadata) to `path` atomically; return their manifest."""
    manifest = manifest_of(weights)
    header = json.dumps({"manifest": manifest.as_json(), "meta": dict(meta or {})}).encode()
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as fh:
        fh.write(_FILE_MAGIC)
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        for view in iter_tensor_bytes(weights):
            fh.write(view)
    tmp.replace(path)
    return manifest


@dataclass(frozen=True)
class StoredWeights:
    """Weights memory-mapped from a file written by `save_weights`."""

    manifest: Manifest
    meta: dict
    weights: Weights


def load_weights(path: Path, verify: bool = True) -> StoredWeights:
    """Memory-map weights from `path`; with `verify`, check the SHA-256 first."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < len(_FILE_MAGIC) + 8:
            raise InvalidWeights(f"{path} is not a Twin Pipelines weights file (too short)")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if mapped[: len(_FILE_MAGIC)] != _FILE_MAGIC:
        raise InvalidWeights(f"{path} is not a Twin Pipelines weights file")
    start = len(_FILE_MAGIC)
    header_len = int.from_bytes(mapped[start : start + 8], "little")
    try:
        header = json.loads(mapped[start + 8 : start + 8 + header_len])
        manifest = Manifest.from_json(header["manifest"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidWeights(f"{path} has a damaged header: {exc!r}") from None
    body = memoryview(mapped)[start + 8 + header_len :]
    if verify and hashlib.sha256(body).hexdigest() != manifest.sha256:
        raise InvalidWeights(f"{path} fails its checksum (file corrupt or truncated)")
    return StoredWeights(manifest, header.get("meta", {}), weights_from_buffer(manifest, body))


def check_compatible(
    weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> None:
    """Raise InvalidWeights unless names, dtypes and shapes match `reference` exactly."""
    got, want = list(weights), list(reference)
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing or extra:
            raise InvalidWeights(f"tensor names differ: missing {missing}, unexpected {extra}")
        raise InvalidWeights("tensor order differs from the model's")
    for name, ref in reference.items():
        arr = weights[name]
        if arr.dtype != ref.dtype:
            raise InvalidWeights(f"tensor {name!r} has dtype {arr.dtype}, expected {ref.dtype}")
        if arr.shape != ref.shape:
            raise InvalidWeights(f"tensor {name!r} has shape {arr.shape}, expected {ref.shape}")


def non_finite_tensors(weights: Mapping[str, np.ndarray]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    return [n for n, a in weights.items() if a.dtype.kind == "f" and not bool(np.isfinite(a).all())]


def delta_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (weights - reference) over floating-point tensors, accumulated in float64."""
    total = 0.0
    for name, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        diff = weights[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_delta_norm: float
) -> float:
    """Validate a site's update against the model it started from; return its delta norm.

    Raises InvalidWeights naming the first problem: names, dtypes, shapes, non-finite values,
    or a change larger than `max_delta_norm`.
    """
    check_compatible(update, reference)
    bad = non_finite_tensors(update)
    if bad:
        raise InvalidWeights(f"non-finite values (NaN or inf) in {bad}")
    norm = delta_norm(update, reference)
    if norm > max_delta_norm:
        raise InvalidWeights(f"update norm {norm:.4g} exceeds the bound {max_delta_norm:.4g}")
    return norm
