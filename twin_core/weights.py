"""Model weights as plain values: ordered named numpy arrays, their byte layout and files.

The byte layout is the one the wire uses: each tensor's raw little-endian bytes in C order,
concatenated in manifest order, with a SHA-256 over the whole. No pickle anywhere, so loading
weights from a site or from disk never executes code.

A weights file (`save_weights`) holds the manifest (whose SHA-256 identifies the model), JSON
metadata, a table of page checksums and the bytes. The page checksums, not the SHA-256, are
what `load_weights` checks: a file at rest needs protection from accidental damage (a flipped
bit, a lost or misdirected page, a truncated copy), not from an adversary, since whoever can
rewrite a file's bytes can rewrite a SHA-256 stored in it as well; and summing 64-bit words is
some 20 times cheaper than SHA-256 (docs/benchmarks.md, benchmark 1). Files of the first
format (`TWINWTS1`, SHA-256 only) are still read, and checked by their SHA-256.
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

_FILE_MAGIC = b"TWINWTS2"
_FILE_MAGIC_V1 = b"TWINWTS1"
# The body is checked in pages of this many bytes: each page's checksum is the sum, modulo
# 2**64, of its little-endian 64-bit words (the last page zero-padded to whole words).
PAGE_BYTES = 4096
_PAGE_WORDS = PAGE_BYTES // 8
_CHECK_ALGORITHM = "sum64-le/4096"
_BODY_ALIGN = 64  # the body starts on a cache line: aligned arrays, faster loops
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


class VerifiedWeights(dict):
    """Weights whose bytes were checked against `manifest` (its SHA-256 included) when this
    mapping was built, from read-only arrays: from a checked stream (twin_wire.codec) or a
    checked file (`load_weights`). Whoever sends or saves them again can reuse the manifest
    instead of hashing the model once more (`known_manifest`)."""

    __slots__ = ("_manifest", "_arrays")

    def __init__(self, manifest: Manifest, weights: Mapping[str, np.ndarray]) -> None:
        super().__init__(weights)
        self._manifest = manifest
        self._arrays = tuple(weights.values())

    def __reduce__(self):  # pickles (and copies) as a plain dict: the proof does not travel
        return (dict, (dict(self),))


def known_manifest(weights: Mapping[str, np.ndarray]) -> Manifest | None:
    """The manifest of `weights` when it is already known to be right, else None.

    Known only for a `VerifiedWeights` that still holds exactly the arrays it was built with,
    all still read-only; anything else (a plain dict, a replaced or writable array) is hashed.
    """
    if not isinstance(weights, VerifiedWeights):
        return None
    arrays = weights._arrays
    if len(weights) != len(arrays):
        return None
    for held, original in zip(weights.values(), arrays, strict=True):
        if held is not original or held.flags.writeable:
            return None
    return weights._manifest


def page_checksums(body: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """One uint64 per `PAGE_BYTES` page of `body`: the sum, modulo 2**64, of its little-endian
    64-bit words (a short last page is zero-padded to whole words).

    Any single changed bit changes its page's sum; so does any damaged page (zeroed, stale,
    from elsewhere) except with probability about 2**-64; a swap of two different pages shows
    in the table's order. What a word sum misses: changes that cancel within one page, such as
    the same bit flipped up in one word and down in another, or words swapped inside a page.
    """
    data = np.frombuffer(body, dtype=np.uint8)
    pages, rest = divmod(data.size, PAGE_BYTES)
    out = np.empty(pages + (1 if rest else 0), dtype=np.uint64)
    if pages:
        words = data[: pages * PAGE_BYTES].view("<u8").reshape(pages, _PAGE_WORDS)
        np.add.reduce(words, axis=1, dtype=np.uint64, out=out[:pages])
    if rest:
        tail = np.zeros(-(-rest // 8) * 8, dtype=np.uint8)
        tail[:rest] = data[pages * PAGE_BYTES :]
        out[pages] = np.add.reduce(tail.view("<u8"), dtype=np.uint64)
    return out


def _header_checksum(header: bytes) -> np.uint64:
    """The header's checksum: the sum of its words, as one page of any length."""
    return np.add.reduce(page_checksums(header), dtype=np.uint64)


class _PageSummer:
    """Page checksums of a byte stream fed in pieces of any length."""

    def __init__(self) -> None:
        self._sums: list[np.ndarray] = []
        self._carry = bytearray()

    def update(self, view: memoryview) -> None:
        start = 0
        if self._carry:
            start = min(PAGE_BYTES - len(self._carry), len(view))
            self._carry += view[:start]
            if len(self._carry) < PAGE_BYTES:
                return
            self._sums.append(page_checksums(self._carry))
            self._carry.clear()
        whole = (len(view) - start) // PAGE_BYTES * PAGE_BYTES
        if whole:
            self._sums.append(page_checksums(view[start : start + whole]))
        self._carry += view[start + whole :]

    def result(self) -> np.ndarray:
        if self._carry:
            self._sums.append(page_checksums(self._carry))
            self._carry.clear()
        return np.concatenate(self._sums) if self._sums else np.empty(0, np.uint64)


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
    """Write weights (and small JSON metadata) to `path` atomically; return their manifest.

    The file: magic, header length, the JSON header (manifest, meta, checksum algorithm;
    padded with spaces so the body starts on a cache line), the checksum table (the header's
    checksum, then each body page's, little-endian uint64), then the body. The SHA-256 of the
    manifest is computed here, unless the weights carry one already checked
    (`known_manifest`: an update as the wire delivered it is not hashed a second time).
    """
    manifest = known_manifest(weights) or manifest_of(weights)
    pages = -(-manifest.total_bytes // PAGE_BYTES)
    doc = {
        "manifest": manifest.as_json(),
        "meta": dict(meta or {}),
        "check": {"algorithm": _CHECK_ALGORITHM, "pages": pages},
    }
    header = json.dumps(doc).encode()
    table_bytes = 8 * (1 + pages)
    used = len(_FILE_MAGIC) + 8 + len(header) + table_bytes
    header += b" " * (-used % _BODY_ALIGN)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    summer = _PageSummer()
    with open(tmp, "wb") as fh:
        fh.write(_FILE_MAGIC)
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        table_at = fh.tell()
        fh.write(bytes(table_bytes))  # filled in once the body's pages are summed
        for view in iter_tensor_bytes(weights):
            summer.update(view)
            fh.write(view)
        table = np.concatenate([[_header_checksum(header)], summer.result()]).astype("<u8")
        if table.size != 1 + pages:
            raise InvalidWeights(f"wrote {table.size - 1} pages, the manifest needs {pages}")
        fh.seek(table_at)
        fh.write(table.tobytes())
    tmp.replace(path)
    return manifest


@dataclass(frozen=True)
class StoredWeights:
    """Weights memory-mapped from a file written by `save_weights`."""

    manifest: Manifest
    meta: dict
    weights: Weights


def load_weights(path: Path, verify: bool = True, check_as_read: bool = False) -> StoredWeights:
    """Memory-map weights from `path`; with `verify`, check the file's checksums first.

    Verified weights are read-only `VerifiedWeights`, whose manifest can be sent or saved
    again without hashing them (`known_manifest`).

    With `check_as_read` (a file of the current format), only the file's size and header are
    checked here; the body's pages are checked by whoever reads them: `PageCheckedWeights`,
    for `twin_core.aggregation.WeightedMean`, which checks each page just before it folds it,
    while the page is in cache (one pass over the bytes instead of two). Give them to nothing
    else: anything else would read unchecked bytes.
    """
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < len(_FILE_MAGIC) + 8:
            raise InvalidWeights(f"{path} is not a Twin Pipelines weights file (too short)")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    magic = mapped[: len(_FILE_MAGIC)]
    if magic not in (_FILE_MAGIC, _FILE_MAGIC_V1):
        raise InvalidWeights(f"{path} is not a Twin Pipelines weights file")
    start = len(_FILE_MAGIC)
    header_len = int.from_bytes(mapped[start : start + 8], "little")
    header_bytes = mapped[start + 8 : start + 8 + header_len]
    try:
        header = json.loads(header_bytes)
        manifest = Manifest.from_json(header["manifest"])
        pages = int(header["check"]["pages"]) if magic == _FILE_MAGIC else 0
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidWeights(f"{path} has a damaged header: {exc!r}") from None
    body_at = start + 8 + header_len
    if magic == _FILE_MAGIC_V1:
        body = memoryview(mapped)[body_at:]
        if verify and hashlib.sha256(body).hexdigest() != manifest.sha256:
            raise InvalidWeights(f"{path} fails its checksum (file corrupt or truncated)")
    else:
        table_at, body_at = body_at, body_at + 8 * (1 + pages)
        body = memoryview(mapped)[body_at:]
        if verify:
            _verify_pages(
                path, mapped, header_bytes, table_at, pages, body, manifest, check_as_read
            )
            if check_as_read:
                table = np.frombuffer(mapped, dtype="<u8", count=pages, offset=table_at + 8)
                weights = weights_from_buffer(manifest, body)
                checker = PageChecker(str(path), body, table)
                return StoredWeights(
                    manifest, header.get("meta", {}), PageCheckedWeights(weights, checker)
                )
    weights = weights_from_buffer(manifest, body)
    return StoredWeights(
        manifest, header.get("meta", {}), VerifiedWeights(manifest, weights) if verify else weights
    )


def _verify_pages(
    path: Path,
    mapped: mmap.mmap,
    header: bytes,
    table_at: int,
    pages: int,
    body: memoryview,
    manifest: Manifest,
    header_only: bool = False,
) -> None:
    if (
        pages != -(-manifest.total_bytes // PAGE_BYTES)
        or len(body) != manifest.total_bytes
        or len(mapped) != table_at + 8 * (1 + pages) + manifest.total_bytes
    ):
        raise InvalidWeights(
            f"{path} fails its checksum (file corrupt or truncated): its body has "
            f"{len(body)} bytes, its manifest declares {manifest.total_bytes}"
        )
    table = np.frombuffer(mapped, dtype="<u8", count=1 + pages, offset=table_at)
    if _header_checksum(header) != table[0]:
        raise InvalidWeights(f"{path} fails its checksum: its header is corrupt")
    if header_only:
        return
    bad = np.flatnonzero(page_checksums(body) != table[1:])
    if bad.size:
        raise InvalidWeights(
            f"{path} fails its checksum (file corrupt): {bad.size} damaged page(s) of "
            f"{PAGE_BYTES} bytes, the first at byte {int(bad[0]) * PAGE_BYTES} of the body"
        )


class PageChecker:
    """Checks the pages of one file's body on demand (`check`), for a reader that checks each
    page just before it uses it. Stateless, so threads may share it."""

    __slots__ = ("path", "_body", "_pages", "_table")

    def __init__(self, path: str, body: memoryview, table: np.ndarray) -> None:
        self.path = path
        self._body = np.frombuffer(body, dtype=np.uint8)
        whole = self._body.size // PAGE_BYTES
        # the whole pages as rows of words: a range of pages is summed in one call
        self._pages = self._body[: whole * PAGE_BYTES].view("<u8").reshape(whole, _PAGE_WORDS)
        self._table = table

    def check(self, start: int, stop: int) -> None:
        """Check every page holding a byte of `body[start:stop]`; InvalidWeights if one fails."""
        if stop <= start:
            return
        first, last = start // PAGE_BYTES, -(-stop // PAGE_BYTES)
        if last <= len(self._pages):
            sums = np.add.reduce(self._pages[first:last], axis=1, dtype=np.uint64)
        else:  # the short last page
            sums = page_checksums(self._body[first * PAGE_BYTES :])
        expected = self._table[first:last]
        if not (sums == expected).all():
            page = first + int(np.flatnonzero(sums != expected)[0])
            raise InvalidWeights(
                f"{self.path} fails its checksum (file corrupt): page {page} of "
                f"{PAGE_BYTES} bytes, at byte {page * PAGE_BYTES} of the body, is damaged"
            )


class PageCheckedWeights(dict):
    """Weights whose bytes are not yet checked: each tensor's pages must be checked by its
    reader before use (`checker` and `offsets`, each tensor's byte offset in the body).
    `load_weights(..., check_as_read=True)` makes them for `WeightedMean`."""

    __slots__ = ("checker", "offsets")

    def __init__(self, weights: Mapping[str, np.ndarray], checker: PageChecker) -> None:
        super().__init__(weights)
        self.checker = checker
        offsets, offset = {}, 0
        for name, array in weights.items():
            offsets[name] = offset
            offset += array.nbytes
        self.offsets = offsets

    def __reduce__(self):
        raise TypeError("PageCheckedWeights are checked as read: do not copy or pickle them")


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


# elements per step of the checks below: their temporaries stay this size (512 KiB of float64)
# whatever the model's size; several updates are checked at once as they arrive, and
# tensor-sized float64 copies made the orchestrator's memory peak at 14 models' worth
CHECK_BLOCK = 1 << 16


def _blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    flat = np.asarray(array).reshape(-1)
    for start in range(0, flat.size, CHECK_BLOCK):
        yield flat[start : start + CHECK_BLOCK]


def non_finite_tensors(weights: Mapping[str, np.ndarray]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    return [
        name
        for name, array in weights.items()
        if array.dtype.kind == "f" and not all(np.isfinite(b).all() for b in _blocks(array))
    ]


def delta_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (weights - reference) over floating-point tensors, accumulated in float64,
    a block at a time."""
    total = 0.0
    scratch = np.empty(CHECK_BLOCK, dtype=np.float64)
    for name, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        for block, ref_block in zip(_blocks(weights[name]), _blocks(ref), strict=True):
            diff = scratch[: block.size]
            np.copyto(diff, block, casting="unsafe")
            np.subtract(diff, ref_block, out=diff)
            total += float(np.dot(diff, diff))
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
