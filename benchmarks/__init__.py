"""Twin Pipelines benchmarks (issue 7): each figure beside its limit, measured in the same run.

Run them all with `python -m benchmarks` (or `make bench`); `--quick` is the CI smoke run.
To add one, write `benchmarks/bench_<name>.py` defining `ORDER` (its row position: the issue's
benchmark number), `TITLE`, and `run(quick: bool) -> list[harness.Result]`; the runner finds
it. Measure the baseline in the same run, interleaved with the subject (`harness.interleaved`),
so that the ratio holds on a loaded machine.
"""
