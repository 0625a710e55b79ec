"""`twin experiment privacy` on a small configuration (3 sites, 2 rounds, 3 arms; the committed
docs/experiments/privacy.md is the full one): the figures are sane. Nothing here is timed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from twin_core.cohort import DEFAULT_SITES
from twin_pipelines import privacy_experiment as px

SITES = tuple(s for s in DEFAULT_SITES if s.site_id in ("site-1", "site-3", "site-5"))
DPSGD = "DP-SGD z=1.0"


@pytest.fixture(scope="module")
def experiment():
    arms = {label: px.ARMS[label] for label in (px.PLAIN, px.SECURE, DPSGD)}
    return px.run(
        rounds=2, seed=7, arms=arms, sites=SITES, bench_sizes=(1000, 5000), bench_repeats=2
    )


def test_secure_aggregation_gives_the_plain_model(experiment):
    plain, secure = experiment.arm(px.PLAIN), experiment.arm(px.SECURE)
    assert plain.model_diff_vs_plain == 0.0 and plain.diff_by_round == [0.0, 0.0]
    # fixed point at 2^-24, the same seed: the same model, two rounds on
    assert len(secure.diff_by_round) == 2 and secure.diff_by_round[0] <= 1e-6
    assert secure.model_diff_vs_plain == secure.diff_by_round[-1] <= 1e-4
    assert secure.pooled_loss == pytest.approx(plain.pooled_loss, rel=1e-5)
    assert secure.epsilon == {} and plain.epsilon == {}


def test_dp_sgd_spends_epsilon_at_every_site_the_largest_site_the_least(experiment):
    dp = experiment.arm(DPSGD)
    assert set(dp.epsilon) == {"site-1", "site-3", "site-5"}
    assert all(0 < e < math.inf for e in dp.epsilon.values()), dp.epsilon
    # the largest site spends the least: its patients are sampled at q = 64 / ~960, which
    # amplifies privacy; site-1 (~16 training patients) has q = 1, no amplification. Between
    # site-1 and site-3 (q ~ 0.5, twice the steps) there is no order: both spend about as much.
    small, middle, large = (dp.epsilon[s] for s in ("site-1", "site-3", "site-5"))
    assert small > 2 * large and middle > 2 * large, dp.epsilon
    # per-patient clipping and noise touch the gradients only: the standardisation buffers,
    # which no plain round changes either, stay exactly as they are
    assert {"numeric_mean", "numeric_std", "target_mean", "target_std"} <= set(experiment.frozen)
    assert dp.frozen_drift == 0.0
    # the noise costs accuracy, but the twin still forecasts (finite, gates relaxed)
    assert math.isfinite(dp.final["mae_h1"]) and dp.final["mae_h1_vs_oracle"] > 0


def test_figures_are_finite_and_times_relative_to_plain(experiment):
    assert [a.label for a in experiment.arms] == [px.PLAIN, px.SECURE, DPSGD]
    assert experiment.smallest == "site-1"
    for arm in experiment.arms:
        assert len(arm.pooled_loss) == len(arm.round_seconds) == 2
        assert 0 < arm.seconds_ratio < math.inf
        for key in ("mae_h1", "mae_h1_vs_oracle", "coverage90_all"):
            assert math.isfinite(arm.final[key]), (arm.label, key)
        assert math.isfinite(arm.per_site["site-1"]["mae_h1_vs_oracle"])
    assert experiment.arm(px.PLAIN).seconds_ratio == 1.0
    # the one-ulp control ran beside plain FedAvg, and the model size was counted
    assert experiment.control_site == "site-5" and len(experiment.control) == 2
    assert all(0 <= d < 1e-3 for d in experiment.control), experiment.control
    assert len(experiment.secure_vs_control) == 2
    assert experiment.model_values > 0
    for row in experiment.bench:
        assert row.sites == px.BENCH_SITES
        assert 0 < row.mask_ratio < math.inf and 0 < row.unmask_ratio < math.inf
        assert row.max_error <= px.BENCH_SITES / 2**24


def test_report_has_the_tables_the_plot_and_prints_figures(experiment, tmp_path: Path):
    path = px.save_report(experiment, tmp_path, "twin experiment privacy --rounds 2")
    text = path.read_text()
    assert "| arm | pooled loss | MAE h1 | x oracle | site-1 MAE h1 | site-1 x oracle |" in text
    assert f"| {px.PLAIN} | " in text and f"| {px.SECURE} | " in text and f"| {DPSGD} | " in text
    assert "| arm | site-1 | site-3 | site-5 |" in text
    assert "| control: plain FedAvg, site-5's first update + 1 float32 ulp | " in text
    assert "DP-SGD's Poisson sampling (from the ledger of DP-SGD z=1.0): site-1 q = 1.00" in text
    assert "| 1,000 | " in text and "| 5,000 | " in text
    assert "not bit-reproducible" in text
    assert "Secure aggregation took" in text and f"- {DPSGD}: epsilon" in text
    assert (tmp_path / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(px.stdout_table(experiment))
    assert DPSGD in table and "site-1 " in table and "max abs difference" in table
    assert "control (plain, site-5's first update + 1 ulp)" in table


def test_the_cli_dispatches_privacy_and_prints_the_figures(monkeypatch, tmp_path: Path, capsys):
    from twin_pipelines import cli

    for key in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)  # restored after the test (cli sets them)
    monkeypatch.setenv("TWIN_HOME", str(tmp_path / "home"))
    calls = []

    def fake(rounds, seed, out, *, echo=None):
        calls.append((rounds, seed, out))
        echo("a figure")
        return out / "privacy.md"

    monkeypatch.setattr(px, "write_report", fake)
    assert cli.main(["experiment", "privacy", "--rounds", "3", "--out", str(tmp_path)]) == 0
    assert calls == [(3, 7, tmp_path)]
    printed = capsys.readouterr().out
    assert "a figure" in printed and f"written: {tmp_path / 'privacy.md'}" in printed
