"""`twin demo` (what `make demo` runs), on a fresh TWIN_HOME, with the default seed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_registers_and_the_loss_falls(tmp_path: Path):
    env = {**os.environ, "TWIN_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipelines", "demo"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = re.findall(
        r"^(r\d{4})\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
        r"(-?[\d.]+) \+- ([\d.]+)\s+[\d.]+\s+(.*)$",
        out.stdout,
        flags=re.MULTILINE,
    )
    assert [r[0] for r in rows] == ["r0001", "r0002", "r0003"], out.stdout
    assert all(r[1] == "5" and r[2] == "0" for r in rows)  # five sites, none failed
    losses = [float(r[3]) for r in rows]
    assert losses[2] < losses[0]
    # the workers hold the cohort's truth (--truth): the oracle stands beside the twin
    assert all(1.0 < float(r[5]) < 1.3 for r in rows), rows
    assert all(0.8 < float(r[6]) < 1.0 for r in rows)  # 90 % intervals, every horizon
    assert [r[9] for r in rows] == [f"patient-twin v{i} (champion)" for i in (1, 2, 3)]
    assert "Twin fitness (r0003)" in out.stdout and "truth -2.40" in out.stdout
    figures = tmp_path / "home" / "rounds" / "r0003" / "twin"
    assert {p.name for p in figures.iterdir()} == {"horizons.png", "trajectories.png"}
    assert "Pooled validation loss fell" in out.stdout
    home = tmp_path / "home"
    assert sorted(p.name for p in (home / "cohort" / "sites").iterdir()) == [
        f"site-{i}.csv" for i in range(1, 6)
    ]
    assert (home / "cohort" / "truth" / "truth.csv").exists()  # ground truth kept apart
    assert (home / "mlflow" / "mlflow.db").exists() and (home / "dagster" / "dagster.yaml").exists()


def test_demo_in_production_mode_says_so_and_spends_a_reported_budget(tmp_path: Path):
    env = {**os.environ, "TWIN_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipelines", "demo", "--production", "--rounds", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Mode: production (mutual TLS;" in out.stdout
    assert "secure aggregation ON" in out.stdout and "patient-level DP-SGD ON" in out.stdout
    rows = re.findall(r"^(r\d{4})\s+5\s+0\s+.*patient-twin v\d \(\w+\)$", out.stdout, re.MULTILINE)
    assert rows == ["r0001", "r0002"], out.stdout
    spent = dict(
        re.findall(r"(site-\d) ([\d.]+)", out.stdout.split("Privacy spent", 1)[1].split("\n")[0])
    )
    assert sorted(spent) == [f"site-{i}" for i in range(1, 6)]
    # two rounds of 2 epochs; the smallest sites (a batch holds them all) spend the most
    assert 0 < float(spent["site-5"]) < float(spent["site-1"]) <= 30
