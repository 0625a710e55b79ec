"""Update compression: what a site sends instead of its trained weights, and back.

A site's update is the delta `trained - start` of its floating-point tensors. With compression
on, the site sends an encoding of that delta (plus the residual it did not send before: error
feedback, Seide et al. 2014, Karimireddy et al. 2019) as an ordinary weights dict, so the codec
and the round storage carry it unchanged. The orchestrator decodes it against the same start
model back to trained weights before it validates and stores them.

Methods, per floating-point tensor `<name>` (integer and boolean buffers travel as they are,
under `<name>::raw`):

- `float16`: `<name>::float16`, the delta rounded to float16 (clipped to +-65504).
- `int8`: `<name>::int8` = rint(delta / scale) in [-127, 127] (round half to even) and
  `<name>::scale` (one float32): max|delta| / 127, so the largest entry is sent exactly
  (scale 0 for an all-zero delta).
- `topk`: the k = ceil(topk_fraction x size) entries of largest |delta| (ties: the lower flat
  index first) as `<name>::topk.index` (flat, ascending, int32; int64 for tensors above 2^31
  entries) and `<name>::topk.value` (the tensor's dtype).

Every payload carries `compression::method` (the method's name as uint8 ASCII), so the
orchestrator knows it is compressed and how, and can refuse a payload that does not match the
round's config. The residual (`corrected - sent`, float64) is the site's to keep: adding it to
its next update means nothing is lost, only delayed: over any number of rounds, what was sent
plus the last residual equals the sum of the true deltas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from twin_core.errors import InvalidWeights

METHODS = ("none", "float16", "int8", "topk")
MARKER = "compression::method"
SEPARATOR = "::"
FLOAT16_MAX = float(np.finfo(np.float16).max)
_INT32_MAX = 2**31 - 1
_ROUNDING_MARGIN = {"float16": 2**-10, "int8": 0.0, "topk": 2**-20}

Arrays = dict[str, np.ndarray]


def method_of(payload: Mapping[str, np.ndarray]) -> str:
    """The compression method a payload declares ("none" without the marker)."""
    marker = payload.get(MARKER)
    if marker is None:
        return "none"
    if marker.dtype != np.uint8 or marker.ndim != 1:
        raise InvalidWeights(
            f"{MARKER} must be a 1-d uint8 array, got {marker.dtype} {marker.shape}"
        )
    name = bytes(np.asarray(marker)).decode("ascii", errors="replace")
    if name not in METHODS[1:]:
        raise InvalidWeights(f"unknown compression method {name!r} in the update")
    return name


def topk_count(size: int, fraction: float) -> int:
    """Entries a tensor of `size` sends under top-k: ceil(fraction x size), at least 1."""
    if size == 0:
        return 0
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, and its ceil 4
    return min(size, max(1, math.ceil(round(fraction * size, 9))))


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """The bytes of a weights dict's tensors: what the wire carries besides its header."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))


def _floating(array: np.ndarray) -> bool:
    return array.dtype.kind == "f"


def _check_method(method: str) -> None:
    if method not in METHODS[1:]:
        raise ValueError(f"unknown compression method {method!r} (choose {', '.join(METHODS)})")


def _clip(delta: Arrays, max_norm: float) -> Arrays:
    norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in delta.values()))
    if norm <= max_norm:
        return delta
    return {k: d * (max_norm / norm) for k, d in delta.items()}


def _norm(arrays: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(
        sum(float(np.dot(a.ravel().astype(np.float64), a.ravel())) for a in arrays.values())
    )


def _encode_tensor(
    name: str, corrected: np.ndarray, dtype: np.dtype, method: str, k_fraction: float
) -> Arrays:
    if method == "float16":
        return {
            f"{name}::float16": np.clip(corrected, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
        }
    if method == "int8":
        peak = float(np.max(np.abs(corrected))) if corrected.size else 0.0
        scale = np.float32(peak / 127)
        step = float(scale)
        q = np.zeros(corrected.shape, np.int8)
        if step > 0:
            q = np.clip(np.rint(corrected / step), -127, 127).astype(np.int8)
        return {f"{name}::int8": q, f"{name}::scale": np.array([scale], np.float32)}
    flat = corrected.ravel()
    k = topk_count(flat.size, k_fraction)
    # a stable sort of -|x|: equal magnitudes keep their index order, so ties go to the lower index
    chosen = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])
    index_dtype = np.int32 if flat.size <= _INT32_MAX else np.int64
    return {
        f"{name}::topk.index": chosen.astype(index_dtype),
        f"{name}::topk.value": flat[chosen].astype(dtype),
    }


def encode_update(
    trained: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    method: str,
    residual: Mapping[str, np.ndarray] | None = None,
    k_fraction: float = 0.1,
    max_norm: float | None = None,
) -> tuple[Arrays, Arrays]:
    """Encode `trained - start` (plus `residual`) with `method`; return (payload, new residual).

    `residual` (float64, by tensor name; None or missing names: zeros) is what earlier updates
    did not send. With `max_norm` (DP-FedAvg's clip), the corrected delta is clipped to it and
    the decoded delta's L2 norm never exceeds it (int8 scales shrink if rounding overshoots);
    what the clip removes is dropped, not carried."""
    _check_method(method)
    if not 0 < k_fraction <= 1:
        raise ValueError(f"k_fraction must be in (0, 1], got {k_fraction}")
    residual = residual or {}
    corrected: Arrays = {}
    payload: Arrays = {MARKER: np.frombuffer(method.encode("ascii"), np.uint8).copy()}
    for name, value in trained.items():
        if SEPARATOR in name:
            raise ValueError(f"tensor name {name!r} contains {SEPARATOR!r}: cannot encode it")
        if not _floating(value):
            payload[f"{name}::raw"] = np.asarray(value)
            continue
        delta = np.asarray(value, np.float64) - np.asarray(start[name], np.float64)
        if name in residual and residual[name].shape == delta.shape:
            delta = delta + residual[name]
        if not bool(np.isfinite(delta).all()):
            raise ValueError(f"the update of {name!r} holds NaN or infinity: nothing to encode")
        corrected[name] = delta
    if max_norm is not None:
        # below the bound by what rounding can add back: float16 moves an entry by at most
        # 2^-11 of it, a float32 top-k value by 2^-24; int8's scales shrink afterwards instead
        corrected = _clip(corrected, max_norm * (1 - _ROUNDING_MARGIN[method]))
    for name, delta in corrected.items():
        payload.update(_encode_tensor(name, delta, trained[name].dtype, method, k_fraction))
    sent = _decoded_deltas(payload, {k: np.asarray(start[k]) for k in corrected})
    if max_norm is not None and method == "int8" and (norm := _norm(sent)) > max_norm:
        shrink = max_norm / norm * (1 - 1e-6)
        for name in corrected:
            payload[f"{name}::scale"] = (payload[f"{name}::scale"] * shrink).astype(np.float32)
        sent = _decoded_deltas(payload, {k: np.asarray(start[k]) for k in corrected})
    new_residual = {name: corrected[name] - sent[name] for name in corrected}
    return payload, new_residual


def _part(payload: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in payload:
        raise InvalidWeights(f"compressed update lacks {key!r}")
    return np.asarray(payload[key])


def _decode_tensor(
    payload: Mapping[str, np.ndarray], name: str, ref: np.ndarray, method: str
) -> np.ndarray:
    """The float64 delta of one tensor, checked against the start tensor `ref`."""
    if method == "float16":
        values = _part(payload, f"{name}::float16")
        if values.dtype != np.float16 or values.shape != ref.shape:
            raise InvalidWeights(
                f"{name}::float16 is {values.dtype} {values.shape}, expected float16 {ref.shape}"
            )
        return values.astype(np.float64)
    if method == "int8":
        q, scale = _part(payload, f"{name}::int8"), _part(payload, f"{name}::scale")
        if q.dtype != np.int8 or q.shape != ref.shape:
            raise InvalidWeights(f"{name}::int8 is {q.dtype} {q.shape}, expected int8 {ref.shape}")
        if scale.dtype != np.float32 or scale.shape != (1,):
            raise InvalidWeights(
                f"{name}::scale is {scale.dtype} {scale.shape}, expected float32 (1,)"
            )
        step = float(scale[0])
        if not (math.isfinite(step) and step >= 0):
            raise InvalidWeights(f"{name}::scale is {step}, expected a finite scale >= 0")
        if bool((q == -128).any()):
            raise InvalidWeights(
                f"{name}::int8 holds -128, outside the symmetric range [-127, 127]"
            )
        return q.astype(np.float64) * step
    index, values = _part(payload, f"{name}::topk.index"), _part(payload, f"{name}::topk.value")
    if index.dtype not in (np.int32, np.int64) or index.ndim != 1:
        raise InvalidWeights(
            f"{name}::topk.index is {index.dtype} {index.shape}, expected 1-d int32"
        )
    if values.dtype != ref.dtype or values.shape != index.shape:
        raise InvalidWeights(
            f"{name}::topk.value is {values.dtype} {values.shape}, expected {ref.dtype} "
            f"{index.shape} (one value per index)"
        )
    if index.size and (int(index.min()) < 0 or int(index.max()) >= ref.size):
        raise InvalidWeights(
            f"{name}::topk.index out of range: [{int(index.min())}, {int(index.max())}] for a "
            f"tensor of {ref.size} entries"
        )
    if index.size > 1 and not bool((np.diff(index) > 0).all()):
        raise InvalidWeights(f"{name}::topk.index is not strictly ascending (repeated entries)")
    delta = np.zeros(ref.size, np.float64)
    delta[index] = values
    return delta.reshape(ref.shape)


def _decoded_deltas(payload: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> Arrays:
    method = method_of(payload)
    return {
        name: _decode_tensor(payload, name, ref, method)
        for name, ref in start.items()
        if _floating(ref)
    }


def _expected_keys(start: Mapping[str, np.ndarray], method: str) -> set[str]:
    parts = {
        "float16": ("float16",),
        "int8": ("int8", "scale"),
        "topk": ("topk.index", "topk.value"),
    }[method]
    keys = {MARKER}
    for name, ref in start.items():
        keys |= {f"{name}::{p}" for p in parts} if _floating(ref) else {f"{name}::raw"}
    return keys


def decode_update(payload: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> Arrays:
    """The trained weights a compressed payload stands for: start + the decoded delta, in the
    start model's names, order and dtypes. Raises InvalidWeights, naming the problem, for a
    payload that does not fit `start` (missing or unexpected keys, wrong dtypes or shapes,
    top-k indices out of range or repeated, a bad int8 scale)."""
    method = method_of(payload)
    if method == "none":
        raise InvalidWeights(f"the update is not compressed (no {MARKER})")
    expected = _expected_keys(start, method)
    if unexpected := sorted(set(payload) - expected):
        raise InvalidWeights(f"compressed update ({method}) has unexpected keys {unexpected[:5]}")
    if missing := sorted(expected - set(payload)):
        raise InvalidWeights(f"compressed update ({method}) lacks {missing[:5]}")
    out: Arrays = {}
    for name, ref in start.items():
        if not _floating(ref):
            raw = np.asarray(payload[f"{name}::raw"])
            if raw.dtype != ref.dtype or raw.shape != ref.shape:
                raise InvalidWeights(
                    f"{name}::raw is {raw.dtype} {raw.shape}, expected {ref.dtype} {ref.shape}"
                )
            out[name] = raw
            continue
        delta = _decode_tensor(payload, name, ref, method)
        out[name] = (np.asarray(ref, np.float64) + delta).astype(ref.dtype)
    return out


def receive_update(
    payload: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], expected: str
) -> Mapping[str, np.ndarray]:
    """The orchestrator's side: the trained weights behind a site's answer, refusing
    (InvalidWeights) an answer compressed otherwise than the round's config asks. An
    uncompressed answer is returned as it is (the same object: whatever the wire knows of it,
    such as its checked manifest, stays with it)."""
    got = method_of(payload)
    if got != expected:
        raise InvalidWeights(
            f"the update is compressed with {got!r} but the round asks for {expected!r}"
        )
    return payload if got == "none" else decode_update(payload, start)
