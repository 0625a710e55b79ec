"""Find the benchmarks, run them, print one table.

Every module `benchmarks/bench_*.py` is a benchmark: it defines `ORDER` (its place in the
table: the issue's benchmark number), `TITLE`, and `run(quick: bool) -> list[Result]`
(benchmarks.harness). `quick` means tiny sizes and few repeats: a smoke run for CI that checks
the benchmark works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import json
import math
import os
import pkgutil
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from benchmarks.harness import Result, load_average

ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "GRPC_VERBOSITY": "NONE",
}


def discover() -> list[ModuleType]:
    """The benchmark modules, in table order."""
    import benchmarks

    modules = [
        importlib.import_module(f"benchmarks.{info.name}")
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith("bench_")
    ]
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 99), m.__name__))


def _read(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    mem_kib = _read("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cpu": _read("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "ram": f"{int(mem_kib) / 1024**2:.1f} GiB" if mem_kib.isdigit() else "unknown",
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "torch": _version("torch"),
    }


@dataclass
class Report:
    quick: bool
    started: str
    machine: dict[str, str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seconds: float = 0.0
    results: list[Result] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # rows each benchmark module produced
    errors: list[tuple[str, str]] = field(default_factory=list)  # (benchmark, traceback)


def run_all(quick: bool = False, only: list[str] | None = None) -> Report:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    report = Report(
        quick=quick,
        started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        load_before=load_average(),
    )
    start = time.perf_counter()
    for module in discover():
        name = module.__name__.removeprefix("benchmarks.")
        if only and not any(o in name for o in only):
            continue
        print(f"running {name} ({'quick' if quick else 'full'}) ...", file=sys.stderr, flush=True)
        try:
            results = module.run(quick)
            report.results.extend(results)
            report.rows[name] = len(results)
        except Exception:
            report.errors.append((name, traceback.format_exc()))
    report.seconds = time.perf_counter() - start
    report.load_after = load_average()
    return report


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    digits = 3 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
    return f"{value:,.{digits}f} {unit}".strip()


def table(results: list[Result]) -> str:
    rows = [
        "| benchmark | figure | baseline (same run) | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        baseline = (
            f"{_fmt(r.baseline, r.unit)} ({r.baseline_label})" if r.baseline is not None else "-"
        )
        ratio = f"{r.ratio:.0%}" if r.ratio is not None else "-"
        verdict = {True: "pass", False: "**miss**", None: "-"}[r.passed]
        rows.append(
            f"| {r.benchmark} | {_fmt(r.figure, r.unit)} | {baseline} | {ratio} "
            f"| {r.target_text} | {verdict} |"
        )
    return "\n".join(rows)


def render(report: Report) -> str:
    m = report.machine
    lines = [
        f"Twin Pipelines benchmarks ({'quick smoke run' if report.quick else 'full run'}), "
        f"{report.started}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; Python {m['python']}, "
        f"numpy {m['numpy']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, torch {m['torch']}",
        "load average (1/5/15 min): before "
        + "/".join(f"{x:.2f}" for x in report.load_before)
        + ", after "
        + "/".join(f"{x:.2f}" for x in report.load_after)
        + f"; {report.seconds:.0f} s",
        "",
        table(report.results),
    ]
    notes = [(r.benchmark, n) for r in report.results for n in r.notes]
    if notes:
        lines += ["", "Notes:"] + [f"- {b}: {n}" for b, n in notes]
    for name, trace in report.errors:
        lines += ["", f"ERROR in {name}:", trace.rstrip()]
    return "\n".join(lines)


def as_json(report: Report) -> dict:
    return {
        "quick": report.quick,
        "started": report.started,
        "machine": report.machine,
        "load_before": report.load_before,
        "load_after": report.load_after,
        "seconds": report.seconds,
        "results": [
            {
                "benchmark": r.benchmark,
                "figure": r.figure,
                "unit": r.unit,
                "baseline": r.baseline,
                "baseline_label": r.baseline_label,
                "ratio": r.ratio,
                "target": r.target_text,
                "passed": r.passed,
                "notes": list(r.notes),
            }
            for r in report.results
        ],
        "errors": [{"benchmark": b, "traceback": t} for b, t in report.errors],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    parser.add_argument(
        "--only", action="append", help="run the benchmarks whose module name contains this"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    report = run_all(quick=args.quick, only=args.only)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(as_json(report), indent=2))
    # a missed target is a finding, printed in the table; only a benchmark that broke fails
    return 1 if report.errors else 0
