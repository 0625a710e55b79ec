"""What a benchmark module returns, and the measuring helpers the benchmarks share.

A figure on a shared, loaded machine means little alone, so every benchmark measures its own
baseline (the machine's limit for the same work) in the same run, interleaved with the subject
(baseline, subject, baseline, subject, ...), and the table shows the ratio of the medians.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """`on` "ratio" (figure / baseline) or "figure" (absolute, in the result's unit)."""

    on: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.on not in ("ratio", "figure") or self.op not in (">=", "<="):
            raise ValueError(f"bad target {self.on} {self.op} {self.value}")

    def met(self, figure: float, ratio: float | None) -> bool | None:
        got = ratio if self.on == "ratio" else figure
        if got is None or not math.isfinite(got):
            return None
        return got >= self.value if self.op == ">=" else got <= self.value

    def describe(self, unit: str) -> str:
        if self.on == "ratio":
            return f"ratio {self.op} {self.value:.0%}"
        return f"{self.op} {self.value:g} {unit}"


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    benchmark: str
    figure: float
    unit: str
    target: Target | None  # None: the issue sets no target; the figure is reported as it is
    baseline: float | None = None  # measured in the same run, same unit as `figure`
    baseline_label: str = ""
    notes: tuple[str, ...] = field(default=())  # printed under the table (memory, breakdown)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline:
            return None
        return self.figure / self.baseline

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.target.met(self.figure, self.ratio)

    @property
    def target_text(self) -> str:
        return "-" if self.target is None else self.target.describe(self.unit)


def interleaved(
    subject: Callable[[], object],
    baseline: Callable[[], object],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Seconds per call of `subject` and `baseline`, run alternately (baseline first) so that
    both see the same machine load; `warmup` untimed calls of each first. `clock`:
    time.process_time for CPU seconds of this process (all its threads) instead of wall."""
    for _ in range(warmup):
        baseline()
        subject()
    subject_s, baseline_s = [], []
    for _ in range(repeats):
        start = clock()
        baseline()
        baseline_s.append(clock() - start)
        start = clock()
        subject()
        subject_s.append(clock() - start)
    return subject_s, baseline_s


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block: `heap` is tracemalloc's peak of Python and numpy allocations
    above the start; `rss` the resident-set high-water mark above the start (it counts pages
    of memory-mapped files too), from /proc/self/status after resetting the mark through
    /proc/self/clear_refs (None where Linux does not offer that)."""

    heap: int
    rss: int | None

    def __enter__(self) -> PeakMemory:
        self._rss_start = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self._rss_start = _status_kib("VmRSS")
        except OSError:
            pass
        self._was_tracing = tracemalloc.is_tracing()
        if not self._was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._heap_start = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.heap = max(0, tracemalloc.get_traced_memory()[1] - self._heap_start)
        if not self._was_tracing:
            tracemalloc.stop()
        hwm = _status_kib("VmHWM")
        self.rss = (
            None if self._rss_start is None or hwm is None else max(0, hwm - self._rss_start) * 1024
        )


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:,.0f} kB"
