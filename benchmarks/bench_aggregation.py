"""Benchmark 1: aggregation throughput, in GB/s of update bytes read.

The subject is the pipeline's own path: updates persisted as .twt files by the RoundStore
(`save_update`, as `site_updates` does), then, as `global_model` does, loaded in sorted site
order (`RoundStore.load(check_as_read=True)`: memory-mapped, size and header checked, each
page's checksum checked by `WeightedMean` just before it folds the page) and folded into the
FedAvg weighted mean (`twin_core.strategies.aggregate`, i.e. `WeightedMean`: `FOLD_GROUP`
updates per pass over the accumulator, on `FOLD_THREADS` threads), up to the candidate's
arrays. The baseline is a plain numpy copy (`np.copyto`) of the same bytes from
the same files into a model-sized buffer. Peak memory is measured on one extra, untimed pass.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import PeakMemory, Result, Target, interleaved, mb, median
from twin_core.aggregation import FOLD_THREADS

ORDER = 1
TITLE = "aggregation throughput"
TARGET = Target("ratio", ">=", 0.5)
FULL = ((10, 1_000_000), (100, 1_000_000), (10, 10_000_000), (100, 10_000_000))
QUICK = ((3, 20_000), (6, 50_000))


def model_of(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`params` float32 parameters in a few tensors shaped like an MLP's."""
    first = params // 2 // 256 * 256
    second = params // 4 // 128 * 128
    rest = params - first - second - 256
    sizes = {
        "layers.0.weight": (first // 256, 256),
        "layers.0.bias": (256,),
        "layers.1.weight": (second // 128, 128),
        "head.weight": (rest,),
    }
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        for name, shape in sizes.items()
    }


def cpu_interleaved(subject, baseline, repeats: int) -> tuple[float, float]:
    """Median CPU seconds of this process (all its threads) per call of `subject` and of
    `baseline`, run alternately: the work each does, which a loaded machine does not inflate
    as it does their wall-clock times (both still pay for cache and memory contention)."""
    import time

    subject_s, baseline_s = interleaved(subject, baseline, repeats, 0, time.process_time)
    return median(subject_s), median(baseline_s)


def _label(n: int, params: int) -> str:
    size = f"{params // 1_000_000} M" if params >= 1_000_000 else f"{params // 1000} k"
    return f"aggregation, {n} updates x {size} params"


def _case(n: int, params: int, repeats: int, root: Path) -> Result:
    from twin_core.strategies import SiteContribution, Strategy, aggregate, planned_steps
    from twin_core.weights import load_weights
    from twin_pipelines.resources.store import RoundStore

    store = RoundStore(root=str(root))
    start = model_of(params)
    model_bytes = sum(a.nbytes for a in start.values())
    sites = [f"site-{i:03d}" for i in range(n)]
    paths = {}
    examples = {s: 100 + 7 * i for i, s in enumerate(sites)}
    for i, site in enumerate(sites):
        update = {k: v + np.float32(0.001 * (i + 1)) for k, v in start.items()}
        paths[site] = store.save_update("r0001", site, update, {"num_examples": examples[site]})
    strategy = Strategy("fedavg")

    def subject() -> dict:
        # twin_pipelines.assets.rounds.global_model, FedAvg branch
        updates_in = (
            (
                SiteContribution(s, examples[s], 10, planned_steps(1, 32, examples[s], 10)),
                store.load(paths[s], check_as_read=True).weights,
            )
            for s in sorted(sites)
        )
        weights, _, _ = aggregate(strategy, start, updates_in, None, total_sites=n)
        return weights

    body_bytes = {s: os.path.getsize(p) - model_bytes for s, p in paths.items()}
    scratch = np.empty(model_bytes, dtype=np.uint8)

    def baseline() -> None:
        for s in sorted(sites):
            with open(paths[s], "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            body = np.frombuffer(mapped, dtype=np.uint8, count=model_bytes, offset=body_bytes[s])
            np.copyto(scratch, body)
            del body
            mapped.close()

    subject_s, baseline_s = interleaved(subject, baseline, repeats)
    read = n * model_bytes
    figure, base = read / median(subject_s) / 1e9, read / median(baseline_s) / 1e9

    # where the time goes: the whole-file check alone, and the fold of unchecked loads alone
    def verify_only() -> None:
        for s in sorted(sites):
            load_weights(paths[s], verify=True)

    def fold_only() -> None:
        unchecked = (
            (SiteContribution(s, examples[s], 0, 0), load_weights(paths[s], verify=False).weights)
            for s in sorted(sites)
        )
        aggregate(strategy, start, unchecked, None)

    verify_s, fold_s = interleaved(verify_only, fold_only, 1 if repeats < 5 else 3, warmup=0)

    # the same path folded on one thread, against the same baseline
    def one_thread_subject() -> None:
        from twin_core import aggregation

        saved = aggregation.FOLD_THREADS
        aggregation.FOLD_THREADS = 1
        try:
            subject()
        finally:
            aggregation.FOLD_THREADS = saved

    single_s, base1_s = interleaved(one_thread_subject, baseline, 1 if repeats < 5 else 3)
    one_thread = median(base1_s) / median(single_s)
    cpu_subject, cpu_baseline = cpu_interleaved(one_thread_subject, baseline, 3)
    verify_gbs, fold_gbs = read / median(verify_s) / 1e9, read / median(fold_s) / 1e9

    with PeakMemory() as peak:
        subject()
    rss = (
        f"; resident-set peak +{mb(peak.rss)} = {peak.rss / model_bytes:.1f} x model "
        "(counts the mapped update files)"
        if peak.rss is not None
        else ""
    )
    return Result(
        _label(n, params),
        figure,
        "GB/s",
        TARGET,
        baseline=base,
        baseline_label="numpy copy of the same bytes",
        notes=(
            f"model {mb(model_bytes)}, {n} updates = {mb(read)} read; median of {repeats}; "
            f"heap peak {mb(peak.heap)} = {peak.heap / model_bytes:.1f} x model{rss}; "
            f"apart: load + whole-file page-checksum check {verify_gbs:.2f} GB/s, "
            f"fold of unchecked loads {fold_gbs:.2f} GB/s; "
            f"{FOLD_THREADS} fold thread(s), {one_thread:.0%} of the baseline on one; "
            f"CPU time on one thread {cpu_subject * 1e3:.0f} ms, baseline "
            f"{cpu_baseline * 1e3:.0f} ms: {cpu_baseline / cpu_subject:.0%}",
        ),
    )


def run(quick: bool) -> list[Result]:
    results = []
    for n, params in QUICK if quick else FULL:
        repeats = 2 if quick else (3 if n * params >= 500_000_000 else 5)
        with tempfile.TemporaryDirectory(prefix="twin-bench-agg-") as tmp:
            results.append(_case(n, params, repeats, Path(tmp)))
    return results
