"""Tests for the tasks (patient twin and tabular) and local training/evaluation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from twin_core.cohort import CohortConfig, cohort_schema, generate_cohort
from twin_core.federation import SiteEvaluation, TrainConfig, pool_moments
from twin_core.rounds import pool_evaluations
from twin_core.schema import check_frame, parse_schema
from twin_core.tasks import split_units, task_for
from twin_core.tasks.patient_twin import PatientTwinTask, TwinHoldout
from twin_core.tasks.tabular import TabularTask
from twin_core.training import evaluate, load_weights_into, train_local, weights_of

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


HOLDOUT, SPLIT_SEED = 0.2, 0
SITES = ("site-1", "site-2")


# ---- helpers ------------------------------------------------------------------------------------
def _same_weights(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def _full_loss(task, model, data: TensorDataset) -> float:
    with torch.no_grad():
        return float(task.loss(model, data.tensors))


def _rng_untouched(action) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    action()
    assert torch.equal(torch.rand(5), expected)


def _assert_metrics_close(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-9), k


# ---- patient twin fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def twin_schema():
    return parse_schema(cohort_schema())


@pytest.fixture(scope="module")
def twin_task(twin_schema):
    return task_for(twin_schema)


@pytest.fixture(scope="module")
def cohort():
    return generate_cohort(CohortConfig(seed=7))


@pytest.fixture(scope="module")
def twin_frames(cohort, twin_schema):
    return {s: check_frame(twin_schema, cohort.site(s)) for s in SITES}


@pytest.fixture(scope="module")
def twin_prepared(twin_task, twin_frames):
    return {s: twin_task.prepare(twin_frames[s], HOLDOUT, SPLIT_SEED) for s in SITES}


@pytest.fixture(scope="module")
def twin_moments(twin_prepared):
    return pool_moments(twin_prepared[s].moments for s in SITES)


def _held_ids(frame: pd.DataFrame, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Train and holdout patient ids, as split_units decides them (by a hash of each id)."""
    ids = np.array(sorted(frame["patient_id"].unique()))
    held = split_units(ids, HOLDOUT, seed)
    return ids[~held], ids[held]


def _tabular_units(task, frame: pd.DataFrame) -> np.ndarray:
    """The units the tabular task splits: ids when the schema names an id column, else rows."""
    ids = task.schema.id_column
    return frame[ids].astype(str).to_numpy() if ids else np.arange(len(frame))


def _patient_keys(numeric: torch.Tensor, baseline: torch.Tensor) -> set[tuple]:
    """(age, bmi, baseline y) as float32 - distinct for every patient of the cohort."""
    rows = torch.cat([numeric.float(), baseline.float().unsqueeze(1)], 1).numpy()
    return {tuple(r) for r in rows}


def _frame_keys(frame: pd.DataFrame, ids) -> set[tuple]:
    base = frame[(frame["visit"] == 0) & frame["patient_id"].isin(ids)]
    values = base[["age", "bmi", "y"]].to_numpy(dtype=np.float32)
    return {tuple(r) for r in values}


# ---- patient twin: prepare ----------------------------------------------------------------------
def test_task_for_picks_the_task(twin_task):
    assert isinstance(twin_task, PatientTwinTask)
    assert twin_task.name == "patient_twin"
    assert twin_task.statistic_names[:5] == ("n", "sum_nll", "sum_abs", "sum_sq", "n_covered90")
    assert "h6_abs" in twin_task.statistic_names and "h6_n" in twin_task.statistic_names


@pytest.mark.parametrize("site", SITES)
def test_twin_prepare_counts(site, twin_prepared, twin_frames, cohort):
    p, frame = twin_prepared[site], twin_frames[site]
    observed_after_baseline = int(((frame["visit"] > 0) & frame["y"].notna()).sum())
    assert p.train_examples + p.holdout_examples == observed_after_baseline
    assert p.units == frame["patient_id"].nunique() == cohort.summary["sites"][site]["n_patients"]
    assert len(p.train) == p.train_examples
    assert len(p.holdout.next_visit[-1]) == p.holdout_examples
    n_held = len(_held_ids(frame)[1])
    assert p.holdout.trajectory.shape == (n_held, 7)
    assert p.holdout.numeric.shape == (n_held, 2)
    assert p.holdout.categorical.shape == (n_held, 2)  # sex one-hot
    assert torch.all(p.holdout.categorical.sum(1) == 1)


@pytest.mark.parametrize("site", SITES)
def test_twin_split_is_by_patient(site, twin_prepared, twin_frames):
    p, frame = twin_prepared[site], twin_frames[site]
    train_ids, held_ids = _held_ids(frame)
    assert len(set(train_ids) & set(held_ids)) == 0
    # the holdout trajectories are exactly the held patients' visits (NaN where unobserved)
    expected = (
        frame[frame["patient_id"].isin(held_ids)]
        .pivot(index="patient_id", columns="visit", values="y")
        .reindex(index=held_ids, columns=range(7))
        .to_numpy()
    )
    np.testing.assert_array_equal(p.holdout.trajectory.numpy(), expected)
    # every training example belongs to a train patient, and none to a held patient
    numeric, _cat, _arm, history, mask, _target, _noise, _y = p.train.tensors
    assert torch.all(mask[:, 0] == 1)
    train_keys = _patient_keys(numeric, history[:, 0])
    held_keys = _patient_keys(p.holdout.numeric, p.holdout.trajectory[:, 0])
    assert train_keys <= _frame_keys(frame, train_ids)
    assert held_keys == _frame_keys(frame, held_ids)
    assert not train_keys & held_keys
    # held-out examples too come only from held patients
    h_numeric, *_rest = p.holdout.next_visit
    h_history = p.holdout.next_visit[3]
    assert _patient_keys(h_numeric, h_history[:, 0]) <= held_keys
    # per-patient example counts: observed visits after baseline of the train patients
    train_rows = frame[frame["patient_id"].isin(train_ids)]
    assert p.train_examples == int(((train_rows["visit"] > 0) & train_rows["y"].notna()).sum())


def test_twin_training_examples_are_next_visit_targets(twin_prepared, twin_frames):
    p, frame = twin_prepared["site-1"], twin_frames["site-1"]
    numeric, _cat, arm, history, mask, target, _noise, y = p.train.tensors
    assert torch.all((target >= 1) & (target <= 6))
    visits = torch.arange(7)
    # history is masked strictly before the target visit
    assert torch.all(mask[visits.unsqueeze(0) >= target.unsqueeze(1)] == 0)
    assert torch.all(history[mask == 0] == 0)
    assert torch.all(torch.isfinite(y))
    assert set(arm.unique().tolist()) <= {0.0, 1.0}
    # each y is an observed value of the frame at that visit
    observed = frame[frame["visit"] > 0][["visit", "y"]].dropna()
    pairs = set(zip(observed["visit"], observed["y"].astype(np.float32), strict=True))
    assert set(zip(target.tolist(), y.numpy(), strict=True)) <= pairs


@pytest.mark.parametrize("site", SITES)
def test_twin_moments_match_pandas(site, twin_prepared, twin_frames):
    p, frame = twin_prepared[site], twin_frames[site]
    train_ids, _ = _held_ids(frame)
    rows = frame[frame["patient_id"].isin(train_ids)]
    moments = {m.column: m for m in p.moments}
    assert list(moments) == ["age", "bmi", "sex=0", "sex=1", "y"]
    # the case mix, as shares: sex=1 is the share of women among the train patients
    assert moments["sex=1"].mean == pytest.approx(float(rows[rows["visit"] == 0]["sex"].mean()))
    y = rows["y"].dropna()
    assert moments["y"].count == len(y)
    assert moments["y"].sum == pytest.approx(float(y.sum()), rel=1e-12)
    assert moments["y"].sum_squares == pytest.approx(float((y**2).sum()), rel=1e-12)
    base = rows[rows["visit"] == 0]
    assert moments["age"].count == len(train_ids)
    assert moments["age"].sum == pytest.approx(float(base["age"].sum()), rel=1e-12)
    assert moments["bmi"].sum_squares == pytest.approx(float((base["bmi"] ** 2).sum()), rel=1e-12)


def test_twin_split_seed_changes_split_not_totals(twin_task, twin_frames):
    frame = twin_frames["site-2"]
    a = twin_task.prepare(frame, HOLDOUT, 0)
    b = twin_task.prepare(frame, HOLDOUT, 1)
    assert a.train_examples + a.holdout_examples == b.train_examples + b.holdout_examples
    assert not torch.equal(a.holdout.numeric, b.holdout.numeric)
    again = twin_task.prepare(frame, HOLDOUT, 0)
    assert torch.equal(a.holdout.numeric, again.holdout.numeric)
    for x, y in zip(a.train.tensors, again.train.tensors, strict=True):
        assert torch.equal(x, y)


# ---- patient twin: model --------------------------------------------------------------------
def test_twin_build_model_seeded(twin_task, twin_moments):
    a = weights_of(twin_task.build_model(twin_moments, 5))
    b = weights_of(twin_task.build_model(twin_moments, 5))
    c = weights_of(twin_task.build_model(twin_moments, 6))
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a if k.startswith("net."))
    # standardisation comes from the moments, not the seed
    for k in ("numeric_mean", "numeric_std", "target_mean", "target_std"):
        assert a[k].tobytes() == c[k].tobytes()
    assert a["target_mean"][0] == pytest.approx(twin_moments["y"].mean, rel=1e-6)
    assert a["numeric_std"][0] == pytest.approx(twin_moments["age"].std, rel=1e-6)
    assert all(v.dtype == np.float32 for v in a.values())


def test_twin_build_model_leaves_global_rng_alone(twin_task, twin_moments):
    _rng_untouched(lambda: twin_task.build_model(twin_moments, 99))


def _train(task, moments, data, config: TrainConfig, seed: int = 0):
    model = task.build_model(moments, seed)
    before = _full_loss(task, model, data)
    steps, metrics = train_local(task, model, data, config)
    return model, before, steps, metrics


_TWIN_CONFIG = TrainConfig(local_epochs=4, batch_size=32, learning_rate=1e-2, seed=11)


def test_twin_training_lowers_loss_and_is_deterministic(twin_task, twin_moments, twin_prepared):
    data = twin_prepared["site-2"].train
    m1, before, steps, metrics = _train(twin_task, twin_moments, data, _TWIN_CONFIG)
    after = _full_loss(twin_task, m1, data)
    assert after < before - 0.1
    assert steps == _TWIN_CONFIG.local_epochs * math.ceil(len(data) / _TWIN_CONFIG.batch_size)
    assert set(metrics) == {"train_loss"} and math.isfinite(metrics["train_loss"])
    assert not m1.training  # left in eval mode

    m2, _, steps2, metrics2 = _train(twin_task, twin_moments, data, _TWIN_CONFIG)
    assert steps2 == steps and metrics2 == metrics
    assert _same_weights(weights_of(m1), weights_of(m2))

    other = dataclasses.replace(_TWIN_CONFIG, seed=12)
    m3, *_ = _train(twin_task, twin_moments, data, other)
    assert not _same_weights(weights_of(m1), weights_of(m3))


def test_train_local_leaves_global_rng_alone(twin_task, twin_moments, twin_prepared):
    model = twin_task.build_model(twin_moments, 0)
    config = TrainConfig(local_epochs=1, batch_size=64, seed=3)
    _rng_untouched(lambda: train_local(twin_task, model, twin_prepared["site-1"].train, config))


def test_train_local_sgd_and_unknown_optimizer(twin_task, twin_moments, twin_prepared):
    data = twin_prepared["site-1"].train
    config = TrainConfig(local_epochs=2, batch_size=16, learning_rate=1e-2, optimizer="sgd")
    model, before, steps, _ = _train(twin_task, twin_moments, data, config)
    assert steps == 2 * math.ceil(len(data) / 16)
    assert not _same_weights(weights_of(model), weights_of(twin_task.build_model(twin_moments, 0)))
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        train_local(twin_task, model, data, TrainConfig(optimizer="lbfgs"))


def test_load_weights_into_round_trip(twin_task, twin_moments):
    source = twin_task.build_model(twin_moments, 1)
    target = twin_task.build_model(twin_moments, 2)
    load_weights_into(target, weights_of(source))
    assert _same_weights(weights_of(target), weights_of(source))


@pytest.fixture(scope="module")
def trained_twin(twin_task, twin_moments, twin_prepared):
    model, *_ = _train(
        twin_task, twin_moments, twin_prepared["site-2"].train, TrainConfig(2, 32, 1e-2, seed=1)
    )
    return model


def test_twin_statistics_are_additive(twin_task, trained_twin, twin_prepared):
    stats = {s: evaluate(twin_task, trained_twin, twin_prepared[s].holdout) for s in SITES}
    for s in SITES:
        assert set(stats[s]) == set(twin_task.statistic_names)
        assert stats[s]["n"] == twin_prepared[s].holdout_examples
    summed = {k: stats["site-1"][k] + stats["site-2"][k] for k in twin_task.statistic_names}
    pooled_holdout = TwinHoldout.concat(
        twin_prepared["site-1"].holdout, twin_prepared["site-2"].holdout
    )
    pooled = evaluate(twin_task, trained_twin, pooled_holdout)
    for k in twin_task.statistic_names:
        assert summed[k] == pytest.approx(pooled[k], rel=1e-5, abs=1e-6), k
    metrics = twin_task.metrics(summed)
    _assert_metrics_close(metrics, twin_task.metrics(pooled))
    n = summed["n"]
    assert n == twin_prepared["site-1"].holdout_examples + twin_prepared["site-2"].holdout_examples
    assert metrics["mae"] == summed["sum_abs"] / n
    assert metrics["rmse"] == math.sqrt(summed["sum_sq"] / n)
    assert metrics["loss"] == summed["sum_nll"] / n
    assert 0.0 <= metrics["coverage90"] <= 1.0
    assert metrics["mae_h1"] == summed["h1_abs"] / summed["h1_n"]
    assert summed["sum_sq"] >= summed["sum_abs"] ** 2 / n  # Cauchy-Schwarz


def test_twin_statistics_by_hand(twin_task, trained_twin, twin_prepared):
    holdout = twin_prepared["site-1"].holdout
    stats = evaluate(twin_task, trained_twin, holdout)
    *inputs, y = holdout.next_visit
    with torch.no_grad():
        mean, sd = trained_twin.forecast(*inputs)
    err = y.double() - mean.double()
    assert stats["n"] == len(y)
    assert stats["sum_abs"] == pytest.approx(float(err.abs().sum()), rel=1e-9)
    assert stats["sum_sq"] == pytest.approx(float((err**2).sum()), rel=1e-9)
    covered = float((err.abs() <= 1.6448536269514722 * sd.double()).sum())
    assert stats["n_covered90"] == covered
    # horizon h: every observed visit j as forecast origin, the visit j + h if observed
    seen = torch.isfinite(holdout.trajectory)
    pairs = [int((seen[:, : 7 - h] & seen[:, h:]).sum()) for h in range(1, 7)]
    assert [stats[f"h{h}_n"] for h in range(1, 7)] == pairs
    # from baseline (origin 0) alone: what monitoring's trajectory MAE is made of
    assert [stats[f"b{h}_n"] for h in range(1, 7)] == [int(seen[:, h].sum()) for h in range(1, 7)]


def test_pool_evaluations_sums_sites_then_computes_metrics(twin_task, trained_twin, twin_prepared):
    evaluations = {
        s: SiteEvaluation(
            s,
            "r1",
            twin_prepared[s].holdout_examples,
            evaluate(twin_task, trained_twin, twin_prepared[s].holdout),
            0.1,
        )
        for s in reversed(SITES)
    }
    result = pool_evaluations(twin_task, evaluations)
    summed = {
        k: sum(evaluations[s].statistics[k] for s in SITES) for k in twin_task.statistic_names
    }
    _assert_metrics_close(result.pooled, twin_task.metrics(summed), rel=1e-12)
    assert list(result.per_site) == ["site-1", "site-2"]
    assert result.per_site["site-2"] == twin_task.metrics(evaluations["site-2"].statistics)
    assert result.examples == {s: twin_prepared[s].holdout_examples for s in SITES}


def test_twin_metrics_without_examples(twin_task):
    assert math.isnan(twin_task.metrics(dict.fromkeys(twin_task.statistic_names, 0.0))["loss"])


# ---- tabular ----------------------------------------------------------------------------------
COLORS = ["red", "green", "blue"]
SHARES = [f"color={c}" for c in COLORS]


def _tabular_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    color = rng.choice(COLORS, size=n)
    y = 2 * x1 - x2 + np.where(color == "red", 1.0, 0.0) + 0.1 * rng.normal(size=n)
    return pd.DataFrame(
        {
            "row_id": [f"r{seed}-{i}" for i in range(n)],
            "x1": x1,
            "x2": x2,
            "color": color,
            "y": y,
            "label": np.where(x1 > 0, "pos", "neg"),
        }
    )


def _tabular_schema(problem: str):
    features = [
        {"name": "x1"},
        {"name": "x2"},
        {"name": "color", "kind": "categorical", "categories": COLORS},
    ]
    doc = {"task": "tabular", "problem": problem, "features": features, "hidden": [16]}
    if problem == "classification":
        doc.update(target="label", classes=["neg", "pos"])
    else:
        doc.update(target="y", id_column="row_id")
    return parse_schema(doc)


@pytest.fixture(scope="module", params=["regression", "classification"])
def tabular(request):
    schema = _tabular_schema(request.param)
    task = task_for(schema)
    frames = [check_frame(schema, _tabular_frame(n, seed)) for n, seed in ((200, 1), (120, 2))]
    prepared = [task.prepare(f, HOLDOUT, SPLIT_SEED) for f in frames]
    moments = pool_moments(p.moments for p in prepared)
    return task, frames, prepared, moments


def test_tabular_task_kind(tabular):
    task, *_ = tabular
    assert isinstance(task, TabularTask) and task.name == "tabular"
    if task.classification:
        assert task.statistic_names == ("n", "sum_nll", "n_correct")
    else:
        assert task.statistic_names == ("n", "sum_sq", "sum_abs", "sum_y", "sum_y2")


def test_tabular_prepare_counts_split_and_moments(tabular):
    task, frames, prepared, _ = tabular
    frame, p = frames[0], prepared[0]
    held = split_units(_tabular_units(task, frame), HOLDOUT, SPLIT_SEED)
    n_held = int(held.sum())
    assert 0 < n_held < 200
    assert p.units == 200 and p.holdout_examples == n_held and p.train_examples == 200 - n_held
    train, hold = frame[~held], frame[held]
    numeric, categorical, target = p.holdout.tensors
    np.testing.assert_array_equal(numeric.numpy(), hold[["x1", "x2"]].to_numpy(np.float32))
    codes = hold["color"].map({c: i for i, c in enumerate(COLORS)}).to_numpy()
    np.testing.assert_array_equal(categorical.numpy(), np.eye(3, dtype=np.float32)[codes])
    tr_numeric, tr_categorical, tr_target = p.train.tensors
    np.testing.assert_array_equal(tr_numeric.numpy(), train[["x1", "x2"]].to_numpy(np.float32))
    assert tr_categorical.shape == (200 - n_held, 3)
    moments = {m.column: m for m in p.moments}
    assert moments["x1"].count == 200 - n_held
    assert moments["x1"].sum == pytest.approx(float(train["x1"].sum()), rel=1e-12)
    assert moments["x2"].sum_squares == pytest.approx(float((train["x2"] ** 2).sum()), rel=1e-12)
    if task.classification:
        assert list(moments) == ["x1", "x2", *SHARES]
        assert target.dtype == torch.int64
        np.testing.assert_array_equal(
            target.numpy(), (hold["label"] == "pos").to_numpy().astype(int)
        )
    else:
        assert list(moments) == ["x1", "x2", *SHARES, "y"]
        assert moments["y"].sum == pytest.approx(float(train["y"].sum()), rel=1e-12)
        np.testing.assert_array_equal(target.numpy(), hold["y"].to_numpy(np.float32))
    red = (train["color"] == "red").mean()
    assert moments["color=red"].mean == pytest.approx(float(red))


def test_tabular_build_model_seeded(tabular):
    task, _, _, moments = tabular
    a = weights_of(task.build_model(moments, 3))
    assert _same_weights(a, weights_of(task.build_model(moments, 3)))
    assert not _same_weights(a, weights_of(task.build_model(moments, 4)))
    out_features = 2 if task.classification else 1
    assert a["net.2.weight"].shape == (out_features, 16)
    assert a["net.0.weight"].shape == (16, 2 + 3)
    assert a["numeric_mean"][0] == pytest.approx(moments["x1"].mean, rel=1e-6)
    _rng_untouched(lambda: task.build_model(moments, 3))


def test_tabular_training_lowers_loss_and_is_deterministic(tabular):
    task, _, prepared, moments = tabular
    data = prepared[0].train
    config = TrainConfig(local_epochs=15, batch_size=32, learning_rate=1e-2, seed=5)
    m1, before, steps, metrics = _train(task, moments, data, config)
    after = _full_loss(task, m1, data)
    assert after < 0.5 * before
    assert steps == 15 * math.ceil(len(data) / 32)
    m2, _, _, metrics2 = _train(task, moments, data, config)
    assert _same_weights(weights_of(m1), weights_of(m2))
    assert metrics == metrics2
    stats = evaluate(task, m1, prepared[0].holdout)
    if task.classification:
        assert task.metrics(stats)["accuracy"] > 0.8
    else:
        assert task.metrics(stats)["r2"] > 0.8


def _split_dataset(data: TensorDataset, at: int) -> tuple[TensorDataset, TensorDataset]:
    return (
        TensorDataset(*(t[:at] for t in data.tensors)),
        TensorDataset(*(t[at:] for t in data.tensors)),
    )


def test_tabular_statistics_are_additive(tabular):
    task, _, prepared, moments = tabular
    model, *_ = _train(task, moments, prepared[0].train, TrainConfig(3, 32, 1e-2, seed=2))
    holdouts = [prepared[0].holdout, prepared[1].holdout]
    stats = [evaluate(task, model, h) for h in holdouts]
    summed = {k: stats[0][k] + stats[1][k] for k in task.statistic_names}
    pooled_data = TensorDataset(
        *(torch.cat([a, b]) for a, b in zip(holdouts[0].tensors, holdouts[1].tensors, strict=True))
    )
    pooled = evaluate(task, model, pooled_data)
    for k in task.statistic_names:
        assert summed[k] == pytest.approx(pooled[k], rel=1e-6, abs=1e-9), k
    metrics = task.metrics(summed)
    _assert_metrics_close(metrics, task.metrics(pooled))
    n = summed["n"]
    assert n == prepared[0].holdout_examples + prepared[1].holdout_examples
    if task.classification:
        assert metrics["accuracy"] == summed["n_correct"] / n
        assert metrics["loss"] == summed["sum_nll"] / n
    else:
        assert metrics["mae"] == summed["sum_abs"] / n
        assert metrics["loss"] == summed["sum_sq"] / n
        assert metrics["rmse"] == math.sqrt(summed["sum_sq"] / n)
        total = summed["sum_y2"] - summed["sum_y"] ** 2 / n
        assert metrics["r2"] == pytest.approx(1 - summed["sum_sq"] / total, rel=1e-12)
    # splitting one holdout in two gives the same sums as evaluating it whole
    first, second = _split_dataset(holdouts[0], 17)
    halves = [evaluate(task, model, h) for h in (first, second)]
    for k in task.statistic_names:
        assert halves[0][k] + halves[1][k] == pytest.approx(stats[0][k], rel=1e-6, abs=1e-9), k


def test_tabular_regression_statistics_by_hand():
    schema = _tabular_schema("regression")
    task = task_for(schema)
    p = task.prepare(check_frame(schema, _tabular_frame(60, 9)), HOLDOUT, SPLIT_SEED)
    model = task.build_model(pool_moments([p.moments]), 0)
    numeric, categorical, target = p.holdout.tensors
    stats = evaluate(task, model, p.holdout)
    with torch.no_grad():
        pred = model(numeric, categorical)[:, 0].double() * model.target_std.double()
        pred = pred + model.target_mean.double()
    err = target.double() - pred
    assert stats["n"] == len(target) == p.holdout_examples
    assert stats["sum_abs"] == pytest.approx(float(err.abs().sum()), rel=1e-9)
    assert stats["sum_y"] == pytest.approx(float(target.double().sum()), rel=1e-12)
    assert task.metrics(stats)["mae"] == stats["sum_abs"] / len(target)


def test_tabular_empty_holdout_statistics(tabular):
    task, _, prepared, moments = tabular
    model = task.build_model(moments, 0)
    empty = TensorDataset(*(t[:0] for t in prepared[0].holdout.tensors))
    stats = evaluate(task, model, empty)
    assert stats == dict.fromkeys(task.statistic_names, 0.0)
    assert math.isnan(task.metrics(stats)["loss"])
