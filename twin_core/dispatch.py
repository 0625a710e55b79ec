"""Fan a call out to many sites at once; failures come back as values, not exceptions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

from twin_core.errors import InvalidWeights, SiteCallError
from twin_core.federation import Site, SiteFailure

T = TypeVar("T")


def run_on_sites(
    sites: Mapping[str, Site],
    call: Callable[[Site], T],
    *,
    stage: str,
    timeout: float,
) -> dict[str, T | SiteFailure]:
    """Run `call(site)` for every site concurrently; return results by site id (sorted).

    A site that raises SiteCallError or InvalidWeights, or is still running after `timeout`
    seconds, yields a SiteFailure. Any other exception is a bug and propagates.
    """
    results: dict[str, T | SiteFailure] = {}
    if not sites:
        return results
    pool = ThreadPoolExecutor(max_workers=min(len(sites), 64), thread_name_prefix=f"site-{stage}")
    try:
        futures = {pool.submit(call, site): site_id for site_id, site in sites.items()}
        deadline = time.monotonic() + timeout
        pending = set(futures)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for future in done:
                site_id = futures[future]
                try:
                    results[site_id] = future.result()
                except SiteCallError as exc:
                    results[site_id] = SiteFailure(site_id, stage, exc.code, exc.message)
                except InvalidWeights as exc:
                    results[site_id] = SiteFailure(site_id, stage, "INVALID_UPDATE", str(exc))
        for future in pending:
            site_id = futures[future]
            results[site_id] = SiteFailure(
                site_id, stage, "DEADLINE_EXCEEDED", f"no answer within {timeout:g} s"
            )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return {s: results[s] for s in sorted(results)}


def split_failures(
    results: Mapping[str, T | SiteFailure],
) -> tuple[dict[str, T], list[SiteFailure]]:
    """Fan-out results as (answers by site, failures), both in site order."""
    answers = {s: r for s, r in results.items() if not isinstance(r, SiteFailure)}
    failures = [r for r in results.values() if isinstance(r, SiteFailure)]
    return answers, failures


class ReceiveSlots:
    """At most `limit` site updates held in the orchestrator's memory at once.

    Sites train concurrently, but an update occupies memory from its first byte on the wire
    until it is persisted; when many sites finish together, many whole models would sit in
    memory side by side. A dispatch thread wraps each site's call in `holding()`; the client
    calls `take()` when the update starts to arrive, which blocks while `limit` others are
    held (the site's stream waits under gRPC flow control); the slot comes back when the call
    ends, after the update is persisted. So peak memory grows with `limit`, not with sites.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"need at least one receive slot, got {limit}")
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.peak = 0  # most slots ever held at once
        self._held = 0

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Around one site's whole call, in the thread that makes it."""
        self._local.held = False
        try:
            yield
        finally:
            if self._local.held:
                self._local.held = False
                with self._lock:
                    self._held -= 1
                self._free.release()

    def take(self) -> None:
        """An update starts to arrive: hold a slot until `holding()` ends (once per call;
        outside `holding()` it does nothing)."""
        if getattr(self._local, "held", None) is not False:
            return
        self._free.acquire()
        self._local.held = True
        with self._lock:
            self._held += 1
            self.peak = max(self.peak, self._held)
