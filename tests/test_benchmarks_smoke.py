"""The benchmark runner in --quick mode: every benchmark runs and reports finite, positive
figures. No timing assertions: the figures depend on the machine and its load."""

from __future__ import annotations

import math

from benchmarks.runner import discover, render, run_all


def test_quick_run_reports_every_benchmark():
    modules = [m.__name__.removeprefix("benchmarks.") for m in discover()]
    assert {"bench_aggregation", "bench_transfer"} <= set(modules)
    report = run_all(quick=True)
    assert not report.errors, report.errors
    assert all(report.rows.get(name, 0) > 0 for name in modules), report.rows
    for r in report.results:
        assert math.isfinite(r.figure) and r.figure > 0, r
        if r.baseline is not None:
            assert math.isfinite(r.baseline) and r.baseline > 0, r
            assert math.isfinite(r.ratio) and r.ratio > 0, r
        assert r.passed in (True, False) or r.target is None, r
    table = render(report)
    for r in report.results:
        assert f"| {r.benchmark} |" in table
    assert "load average" in table
