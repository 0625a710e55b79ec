"""Tests for twin_core.dispatch.run_on_sites: concurrent fan-out with failures as values."""

from __future__ import annotations

import threading
import time

import pytest

from twin_core.dispatch import run_on_sites
from twin_core.errors import InvalidWeights, SiteCallError
from twin_core.federation import SiteFailure


class _Site:
    """A stand-in site: `behaviour(site)` is what calling it does."""

    def __init__(self, site_id: str, behaviour):
        self.site_id = site_id
        self.behaviour = behaviour


def _call(site: _Site):
    return site.behaviour(site)


def _answer(value, delay: float = 0.0):
    def behaviour(site):
        if delay:
            time.sleep(delay)
        return (site.site_id, value)

    return behaviour


def _raise(exc: BaseException):
    def behaviour(site):
        raise exc

    return behaviour


def test_no_sites_gives_empty_result():
    assert run_on_sites({}, _call, stage="info", timeout=1.0) == {}


def test_results_sorted_by_site_id_whatever_the_completion_order():
    # the site that sorts first finishes last
    sites = {
        "site-3": _Site("site-3", _answer(3)),
        "site-1": _Site("site-1", _answer(1, delay=0.2)),
        "site-2": _Site("site-2", _answer(2, delay=0.1)),
    }
    out = run_on_sites(sites, _call, stage="info", timeout=10.0)
    assert list(out) == ["site-1", "site-2", "site-3"]
    assert out == {"site-1": ("site-1", 1), "site-2": ("site-2", 2), "site-3": ("site-3", 3)}


def test_calls_run_concurrently():
    barrier = threading.Barrier(3, timeout=5.0)

    def behaviour(site):
        barrier.wait()  # raises BrokenBarrierError unless all three run at once
        return site.site_id

    sites = {s: _Site(s, behaviour) for s in ("a", "b", "c")}
    assert run_on_sites(sites, _call, stage="train", timeout=10.0) == {"a": "a", "b": "b", "c": "c"}


@pytest.mark.parametrize(
    "exc, code, reason",
    [
        (
            SiteCallError("site-2", "UNAVAILABLE", "connection refused"),
            "UNAVAILABLE",
            "connection refused",
        ),
        (
            SiteCallError("site-2", "FAILED_PRECONDITION", "schema differs"),
            "FAILED_PRECONDITION",
            "schema differs",
        ),
        (
            InvalidWeights("non-finite values (NaN or inf) in ['w']"),
            "INVALID_UPDATE",
            "non-finite values (NaN or inf) in ['w']",
        ),
    ],
    ids=["unavailable", "precondition", "invalid-weights"],
)
def test_expected_errors_become_site_failures(exc, code, reason):
    sites = {
        "site-1": _Site("site-1", _answer("ok")),
        "site-2": _Site("site-2", _raise(exc)),
    }
    out = run_on_sites(sites, _call, stage="train", timeout=10.0)
    assert out["site-1"] == ("site-1", "ok")
    assert out["site-2"] == SiteFailure("site-2", "train", code, reason)
    assert list(out) == ["site-1", "site-2"]


def test_slow_site_becomes_deadline_exceeded_quickly():
    release = threading.Event()

    def stuck(site):
        release.wait(30.0)
        return "too late"

    sites = {
        "fast": _Site("fast", _answer("done")),
        "slow": _Site("slow", stuck),
    }
    timeout = 0.5
    start = time.monotonic()
    try:
        out = run_on_sites(sites, _call, stage="evaluate", timeout=timeout)
        elapsed = time.monotonic() - start
    finally:
        release.set()  # let the abandoned worker thread finish
    assert elapsed < timeout + 3.0
    assert out["fast"] == ("fast", "done")
    failure = out["slow"]
    assert isinstance(failure, SiteFailure)
    assert (failure.site_id, failure.stage, failure.code) == (
        "slow",
        "evaluate",
        "DEADLINE_EXCEEDED",
    )
    assert "no answer within" in failure.reason
    assert list(out) == ["fast", "slow"]


def test_all_sites_slow_all_deadline_exceeded():
    release = threading.Event()
    sites = {s: _Site(s, lambda site: release.wait(30.0)) for s in ("b", "a")}
    start = time.monotonic()
    try:
        out = run_on_sites(sites, _call, stage="info", timeout=0.3)
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert elapsed < 0.3 + 3.0
    assert list(out) == ["a", "b"]
    assert all(isinstance(f, SiteFailure) and f.code == "DEADLINE_EXCEEDED" for f in out.values())


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("k"), RuntimeError("boom")])
def test_other_exceptions_propagate(exc):
    sites = {
        "site-1": _Site("site-1", _answer("ok")),
        "site-2": _Site("site-2", _raise(exc)),
    }
    with pytest.raises(type(exc)):
        run_on_sites(sites, _call, stage="train", timeout=10.0)


def test_receive_slots_bound_the_updates_held_at_once():
    """Eight sites finish together; with two slots, never more than two updates are held."""
    import threading

    from twin_core.dispatch import ReceiveSlots

    slots = ReceiveSlots(2)
    holding_now, most = [0], [0]
    lock = threading.Lock()

    class Arriving:
        def __init__(self, site_id):
            self.site_id = site_id

        def call(self):
            with slots.holding():
                slots.take()  # the update's first chunk arrives
                slots.take()  # a second take in the same call holds no second slot
                with lock:
                    holding_now[0] += 1
                    most[0] = max(most[0], holding_now[0])
                time.sleep(0.02)  # received and persisted
                with lock:
                    holding_now[0] -= 1
            return self.site_id

    sites = {f"s{i}": Arriving(f"s{i}") for i in range(8)}
    results = run_on_sites(sites, lambda site: site.call(), stage="train", timeout=30)
    assert sorted(results) == sorted(sites)
    assert most[0] == 2 and slots.peak == 2
    # every slot came back, and take() outside holding() does nothing
    slots.take()
    assert all(slots._free.acquire(blocking=False) for _ in range(2))
    with pytest.raises(ValueError, match="at least one"):
        ReceiveSlots(0)


def test_a_failed_call_gives_its_slot_back():
    from twin_core.dispatch import ReceiveSlots

    slots = ReceiveSlots(1)
    with pytest.raises(RuntimeError), slots.holding():
        slots.take()
        raise RuntimeError("the site died mid-stream")
    with slots.holding():
        slots.take()  # would block forever if the slot had leaked
