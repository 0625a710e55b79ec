"""SiteHandler over a data source that changes: reloads, and refusals when it breaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from site_worker.data import FileSource
from site_worker.handler import SiteHandler
from twin_core.errors import SiteCallError
from twin_core.federation import TrainConfig, pool_moments
from twin_core.training import weights_of


def _start(handler: SiteHandler):
    moments = pool_moments([handler.info().moments])
    return weights_of(handler.task.build_model(moments, seed=0))


def test_a_growing_extract_is_reloaded_and_a_broken_one_stops_training(
    cohort_dir: Path, tmp_path: Path
):
    full = pd.read_csv(cohort_dir / "sites" / "site-3.csv")
    first_patients = sorted(full.patient_id.unique())[:100]
    extract = tmp_path / "site-3.csv"
    full[full.patient_id.isin(first_patients)].to_csv(extract, index=False)
    handler = SiteHandler.from_source(
        "site-3", FileSource(extract, cohort_dir / "schema.yaml"), state_dir=tmp_path / "state"
    )
    assert handler.info().units == 100
    handler.train("r0001", handler.schema.fingerprint, TrainConfig(), _start(handler))
    assert (tmp_path / "state" / "reference.parquet").exists()
    assert (tmp_path / "state" / "reference_round").read_text() == "r0001"

    full.to_csv(extract, index=False)  # new patients arrive
    assert handler.info().units == 150

    extract.write_text("patient_id,visit\nbroken,row\n")  # an extract that no longer loads
    info = handler.info()
    assert info.units == 150  # the previous data is kept, nothing is lost
    assert not info.data_check_passed and "data_file_loads" in info.data_check_summary
    with pytest.raises(SiteCallError) as exc:
        handler.train("r0002", handler.schema.fingerprint, TrainConfig(), _start(handler))
    assert exc.value.code == "FAILED_PRECONDITION" and "data_file_loads" in exc.value.message

    # a restarted worker picks up the reference window of its last training
    full.to_csv(extract, index=False)
    again = SiteHandler.from_source(
        "site-3", FileSource(extract, cohort_dir / "schema.yaml"), state_dir=tmp_path / "state"
    )
    summary = again.drift()
    assert summary.reference_round == "r0001" and summary.has_reference
    # the full Evidently report stays at the site; none of it travels unless allowed
    assert summary.report_html == b""
    assert b"<html" in (tmp_path / "state" / "drift_report.html").read_bytes()[:2000].lower()


def test_missing_covariates_train_without_nan(make_handler):
    healthy = make_handler("site-4")
    frame = healthy.frame.copy()
    rows = frame.index[frame.visit == 0][:10]
    frame.loc[rows, "bmi"] = np.nan  # 10 of 400 patients: within the 5 % limit
    handler = SiteHandler("site-4", healthy.schema, frame)
    assert handler.check_data().success
    update = handler.train("r1", handler.schema.fingerprint, TrainConfig(), _start(handler))
    assert all(np.isfinite(w).all() for w in update.weights.values())
    assert np.isfinite(update.metrics["train_loss"])
