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
        r"^(r\d{4})\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+(.*)$",
        out.stdout,
        flags=re.MULTILINE,
    )
    assert [r[0] for r in rows] == ["r0001", "r0002", "r0003"]
    assert all(r[1] == "5" and r[2] == "0" for r in rows)  # five sites, none failed
    losses = [float(r[3]) for r in rows]
    assert losses[2] < losses[0]
    assert [r[6] for r in rows] == [f"patient-twin v{i} (champion)" for i in (1, 2, 3)]
    assert "Pooled validation loss fell" in out.stdout
    home = tmp_path / "home"
    assert sorted(p.name for p in (home / "cohort" / "sites").iterdir()) == [
        f"site-{i}.csv" for i in range(1, 6)
    ]
    assert (home / "cohort" / "truth" / "truth.csv").exists()  # ground truth kept apart
    assert (home / "mlflow" / "mlflow.db").exists() and (home / "dagster" / "dagster.yaml").exists()
