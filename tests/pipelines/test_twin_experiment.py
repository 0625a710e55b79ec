"""Issue 5's expected outcomes, on a small version of `twin experiment twin` (2 seeds, 8 rounds of
20 local steps; the committed report in docs/experiments/twin.md is the full one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from twin_core.cohort import cohort_schema
from twin_core.schema import parse_schema
from twin_core.tasks import task_for
from twin_pipelines import twin_experiment as tx


@pytest.fixture(scope="module")
def experiment():
    # the report's settings, scaled down: equal local steps at every site, fewer rounds
    return tx.run(seeds=2, rounds=8, local_epochs=2, local_steps=20, epochs=8)


@pytest.fixture(scope="module")
def task():
    return task_for(parse_schema(cohort_schema()))


def test_acceptance_holds_on_the_small_version(experiment):
    checks = {c.name: c for c in experiment.checks}
    assert len(checks) == 7
    # every site within 20 % of the oracle needs the full run's seeds (site-1 holds ~4
    # holdout patients per seed); the rest must hold here already
    for name, check in checks.items():
        if not name.startswith("within 20 %"):
            assert check.passed, (name, check.value)


def test_arms_are_trained_and_evaluated_alike(experiment, task):
    for run in experiment.runs:
        assert set(run.stats) == {"central", "federated", "local"}
        sites = {arm: set(stats) for arm, stats in run.stats.items()}
        assert (
            sites["central"]
            == sites["federated"]
            == sites["local"]
            == {f"site-{i}" for i in range(1, 6)}
        )
        # the same holdout patients in every arm: the same forecast points, the same oracle
        for site in sites["central"]:
            counts = {arm: run.stats[arm][site]["h1_n"] for arm in run.stats}
            assert len(set(counts.values())) == 1, counts
            oracle = {arm: run.stats[arm][site]["h1_oracle_abs"] for arm in run.stats}
            assert len(set(oracle.values())) == 1, oracle
        assert run.federated_rounds_passed >= 1
        assert run.true_ate == -2.4
    # the federated twin is the registered one: it differs from central and local
    fed = tx.metrics(task, experiment.runs, "federated")
    cen = tx.metrics(task, experiment.runs, "central")
    assert fed["mae_h1"] != cen["mae_h1"]
    assert fed["oracle_mae_h1"] == cen["oracle_mae_h1"]


def test_report_has_the_tables_and_the_plot(experiment, task, tmp_path: Path):
    lines = tx.report_lines(experiment, task, "twin experiment twin --seeds 2 --rounds 4")
    text = "\n".join(lines)
    assert "| horizon-1 MAE within 10 % of the oracle's, pooled over sites |" in text
    assert "| oracle | " in text and "| last value | " in text
    assert text.count("| 0 | -2.40 | ") == 2 and text.count("| 1 | -2.40 | ") == 2
    tx.plot(experiment, task, tmp_path / "twin.png")
    assert (tmp_path / "twin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
