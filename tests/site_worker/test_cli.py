"""`python -m site_worker` as a process: start-up refusals and graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from site_worker.cli import settings_from_args
from twin_core.federation import TrainConfig, pool_moments
from twin_core.schema import parse_schema
from twin_core.tasks import task_for
from twin_core.training import weights_of
from twin_wire.client import GrpcSite


def _run(*args: str, timeout: float = 120, insecure: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "site_worker", *args, *(["--insecure"] if insecure else [])],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            lambda f: f.assign(age=f.age.astype(object).where(f.index != 5, "forty")),
            "column 'age' has 1 non-numeric value(s), first in data row 6",
        ),
        (lambda f: f.drop(columns=["bmi"]), "missing column(s) ['bmi']"),
        (lambda f: f.assign(sex=f.sex.where(f.index != 3, 7)), "outside the declared categories"),
        (lambda f: pd.concat([f, f.iloc[[0]]]), "duplicate (patient_id, visit)"),
    ],
    ids=["non-numeric", "missing-column", "unknown-category", "duplicate-visit"],
)
def test_malformed_csv_is_refused_at_start_up(cohort_dir: Path, tmp_path: Path, damage, expected):
    frame = pd.read_csv(cohort_dir / "sites" / "site-1.csv")
    bad = tmp_path / "bad.csv"
    damage(frame).to_csv(bad, index=False)
    result = _run(
        "--site-id",
        "site-1",
        "--data",
        str(bad),
        "--schema",
        str(cohort_dir / "schema.yaml"),
        "--port",
        "0",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert result.returncode == 2
    assert "refusing to start site site-1" in result.stderr and expected in result.stderr
    assert "forty" not in result.stderr  # the message names the column and row, not the value


def test_unparseable_file_and_bad_config_are_refused(cohort_dir: Path, tmp_path: Path):
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b'a,b\n"unterminated\n1,2,3,4\n')
    result = _run(
        "--site-id",
        "s",
        "--data",
        str(garbage),
        "--schema",
        str(cohort_dir / "schema.yaml"),
        "--state-dir",
        str(tmp_path),
    )
    assert result.returncode == 2 and "refusing to start" in result.stderr
    result = _run("--site-id", "s", "--data", str(garbage), "--state-dir", str(tmp_path))
    assert result.returncode == 2 and "--data needs --schema" in result.stderr
    config = tmp_path / "site.yaml"
    config.write_text("site_id: s\nstate_dir: /tmp/x\nsynthetic: true\nport: 1\nflavour: vanilla\n")
    result = _run("--config", str(config))
    assert result.returncode == 2 and "unknown key(s) ['flavour']" in result.stderr


def test_a_worker_must_say_how_it_is_secured(tmp_path: Path):
    result = _run("--site-id", "s", "--synthetic", "--state-dir", str(tmp_path), insecure=False)
    assert result.returncode == 2
    assert "give --tls-dir DIR" in result.stderr and "or --insecure" in result.stderr
    missing = _run(
        "--site-id",
        "s",
        "--synthetic",
        "--state-dir",
        str(tmp_path),
        "--tls-dir",
        str(tmp_path / "nowhere"),
        insecure=False,
    )
    assert missing.returncode == 2 and "missing TLS file(s) for s" in missing.stderr


def test_config_file_and_flags_merge(tmp_path: Path):
    config = tmp_path / "site.yaml"
    config.write_text(
        "site_id: site-2\nstate_dir: /srv/twin\nsynthetic: true\nport: 6000\ninsecure: true\n"
    )
    settings = settings_from_args(["--config", str(config), "--port", "6001"])
    assert settings.site_id == "site-2" and settings.port == 6001 and settings.synthetic


def _start_worker(tmp_path: Path, site_id: str) -> tuple[subprocess.Popen, Path, int]:
    ready, log = tmp_path / "port", tmp_path / "worker.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "site_worker",
                "--site-id",
                site_id,
                "--synthetic",
                "--port",
                "0",
                "--state-dir",
                str(tmp_path),
                "--ready-file",
                str(ready),
                "--grace-seconds",
                "60",
                "--insecure",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.05)
    return process, log, int(ready.read_text())


def test_sigterm_lets_the_running_round_finish_then_exits(tmp_path: Path):
    process, log, port = _start_worker(tmp_path, "site-3")
    try:
        site = GrpcSite("site-3", f"127.0.0.1:{port}")
        info = site.info(timeout=10)
        task = task_for(parse_schema(info.schema))
        start = weights_of(task.build_model(pool_moments([info.moments]), seed=0))
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["update"] = site.train(
                    "r0001",
                    info.schema_fingerprint,
                    TrainConfig(local_epochs=40),
                    start,
                    timeout=120,
                )
            except Exception as exc:  # recorded and asserted on below
                outcome["error"] = exc

        thread = threading.Thread(target=train)
        thread.start()
        deadline = time.monotonic() + 60
        while "train start" not in log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGTERM)
        thread.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["update"].steps == 40 * -(-info.train_examples // 64)
        assert process.wait(timeout=60) == 0
        text = log.read_text()
        assert "received SIGTERM" in text and text.rstrip().endswith("stopped")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
