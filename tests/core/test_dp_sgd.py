"""Patient-level DP-SGD (twin_core/dp_sgd.py): steps by hand, the per-patient bound, the noise,
determinism, and the patient twin trained end to end under it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from twin_core.cohort import DEFAULT_SITES, CohortConfig, cohort_schema, generate_cohort
from twin_core.dp_sgd import (
    clipped_sum,
    per_patient_gradients,
    row_units,
    sample_patients,
    train_dp_sgd,
)
from twin_core.federation import TrainConfig
from twin_core.privacy import dpsgd_event_from_metrics, epsilon, planned_dpsgd_event
from twin_core.schema import check_frame, parse_schema
from twin_core.tasks import UnitDataset, task_for
from twin_core.training import load_weights_into, train_local, weights_of


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- a linear model whose gradients are known in closed form ------------------------------------
class Squares:
    """loss = mean over rows of (w . x - y)^2; a row's gradient is 2 (w . x - y) x."""

    def loss(self, model, batch):
        x, y = batch
        return ((model(x).squeeze(1) - y) ** 2).mean()


class Zero:
    """A loss whose gradient is zero everywhere: a step moves the weights by the noise alone."""

    def loss(self, model, batch):
        (x,) = batch
        return 0.0 * model(x).sum()


def _linear(d: int, w: np.ndarray | None = None) -> torch.nn.Linear:
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w if w is not None else np.zeros(d)).view(1, d))
    return model


def _toy(seed: int = 0, patients: int = 6, d: int = 3):
    """Patients with 1..4 rows each; returns (UnitDataset, numpy x, y, unit per row)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, size=patients)
    units = np.repeat(np.arange(patients), counts)
    x = rng.normal(size=(len(units), d))
    y = rng.normal(size=len(units))
    data = UnitDataset(
        torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), units=units
    )
    return data, x, y, units


def _by_hand_step(w, x, y, units, chosen, clip, lr, expected):
    """One DP-SGD step without noise, in float64 numpy: each chosen patient's summed row
    gradients clipped to `clip`, summed, over the expected batch size, times -lr."""
    total = np.zeros_like(w)
    for k in np.flatnonzero(chosen):
        rows = units == k
        g = (2 * (x[rows] @ w - y[rows])[:, None] * x[rows]).sum(0)
        norm = np.linalg.norm(g)
        total += g * min(1.0, clip / norm)
    return w - lr * total / expected


def _config(**kw) -> TrainConfig:
    base = {"local_epochs": 1, "optimizer": "sgd", "seed": 5, "dpsgd_clip": 1e-3}
    return TrainConfig(**(base | kw))


# ---- one step by hand ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_one_step_every_patient_by_hand(method):
    """q = 1 (batch >= patients): one step is -lr times the mean of the clipped per-patient
    gradients (a tiny clip, so every patient is clipped)."""
    data, x, y, units = _toy()
    w0 = np.array([0.3, -0.2, 0.5])
    model = _linear(3, w0)
    config = _config(batch_size=100, learning_rate=0.7, dpsgd_noise_multiplier=0.0)
    steps, metrics = train_dp_sgd(Squares(), model, data, config, method=method)
    assert steps == 1 and metrics["dpsgd_sample_rate"] == 1.0 and metrics["dpsgd_patients"] == 6
    expected = _by_hand_step(w0, x, y, units, np.ones(6, bool), 1e-3, 0.7, 6)
    np.testing.assert_allclose(model.weight.detach().numpy()[0], expected, rtol=1e-5, atol=1e-9)
    # clipping the rows instead of the patients would give something else
    by_rows = _by_hand_step(w0, x, y, np.arange(len(y)), np.ones(len(y), bool), 1e-3, 0.7, 6)
    assert not np.allclose(expected, by_rows, rtol=1e-3)


def test_one_step_with_poisson_sampling_by_hand():
    """q = 2/6: the sampled patients are the generator's first draws (sample_patients), and
    the clipped sum is divided by the EXPECTED batch size q * n = 2, not the realised one."""
    data, x, y, units = _toy(seed=3)
    w0 = np.array([0.1, 0.4, -0.3])
    model = _linear(3, w0)
    config = _config(batch_size=2, learning_rate=0.5, dpsgd_noise_multiplier=0.0, seed=8)
    # one step only: a time budget of ~0 stops after the first step
    steps, metrics = train_dp_sgd(
        Squares(), model, data, dataclasses.replace(config, time_budget_s=1e-9)
    )
    assert steps == 1 and metrics["dpsgd_sample_rate"] == pytest.approx(1 / 3)
    chosen = sample_patients(torch.Generator().manual_seed(8), 6, 1 / 3).numpy()
    assert 0 < chosen.sum() != 2  # the seed picks a realised batch unlike the expected one
    expected = _by_hand_step(w0, x, y, units, chosen, 1e-3, 0.5, 2.0)
    np.testing.assert_allclose(model.weight.detach().numpy()[0], expected, rtol=1e-5, atol=1e-9)


def test_steps_per_epoch_follow_the_sample_rate():
    data, *_ = _toy()
    model = _linear(3)
    steps, metrics = train_dp_sgd(
        Squares(), model, data, _config(batch_size=4, local_epochs=3, dpsgd_noise_multiplier=1.0)
    )
    assert steps == 3 * math.ceil(6 / 4) == 6
    planned = planned_dpsgd_event(1.0, 4, 6, 3)
    assert dpsgd_event_from_metrics(metrics) == planned


# ---- one patient's influence is bounded ---------------------------------------------------------
CLIP = 0.5


def _summed(data, model, clip=CLIP):
    units = row_units(data)
    grads = per_patient_gradients(Squares(), model, data.tensors, units, int(units.max()) + 1)
    return torch.cat([g.flatten() for g in clipped_sum(grads, clip)[0]])


def test_one_patient_moves_the_clipped_sum_by_at_most_twice_the_clip():
    data, x, y, units = _toy(seed=1, patients=8)
    model = _linear(3, np.array([0.2, 0.1, -0.4]))
    before = _summed(data, model)
    # patient 2's rows replaced by wild values (every row: a patient with several rows)
    wild_x, wild_y = x.copy(), y.copy()
    rows = units == 2
    assert rows.sum() == 4
    wild_x[rows] = 1e3  # every row pulls the same way
    wild_y[rows] = -1e4
    wild = UnitDataset(
        torch.tensor(wild_x, dtype=torch.float32),
        torch.tensor(wild_y, dtype=torch.float32),
        units=units,
    )
    moved = float((_summed(wild, model) - before).norm())
    assert 0.1 * CLIP < moved <= 2 * CLIP * (1 + 1e-6)
    # unclipped, the same change moves the gradient sum by orders of magnitude more
    unclipped = _summed(wild, model, clip=math.inf) - _summed(data, model, clip=math.inf)
    assert float(unclipped.norm()) > 1e4 * CLIP
    # without the patient at all: at most one clip
    keep = units != 2
    without = UnitDataset(*(t[torch.from_numpy(keep)] for t in data.tensors), units=units[keep])
    assert float((_summed(without, model) - before).norm()) <= CLIP * (1 + 1e-6)
    # had rows been the units, the wild patient (4 rows) would move the sum by up to 2 * clip
    # per row, beyond the patient's bound
    as_rows = TensorDataset(*wild.tensors)
    moved_rows = float(
        (_summed(as_rows, model) - _summed(TensorDataset(*data.tensors), model)).norm()
    )
    assert moved_rows > 4 * CLIP  # measured: 2.37 (the patient-level figure: 0.73)


def test_row_units():
    data, _x, _y, units = _toy()
    assert torch.equal(row_units(data), torch.from_numpy(units))
    assert torch.equal(row_units(TensorDataset(torch.zeros(4, 1))), torch.arange(4))
    # any integer labels are renumbered 0..n-1
    odd = UnitDataset(torch.zeros(4, 1), units=np.array([7, 3, 7, 9]))
    assert row_units(odd).tolist() == [1, 0, 1, 2]


# ---- the noise ----------------------------------------------------------------------------------
def test_the_noise_of_a_step_has_the_configured_std():
    """Zero gradients and SGD at lr 1: the step is -(noise) / (q n); noise per coordinate is
    N(0, (sigma * clip)^2). 20 000 coordinates: the sample std's own std is 0.5 %, 3 % is 6."""
    torch.manual_seed(0)
    model = torch.nn.Linear(400, 50)
    start = [p.detach().clone() for p in model.parameters()]
    n, sigma, clip = 8, 2.0, 0.75
    data = UnitDataset(torch.zeros(2 * n, 400), units=np.repeat(np.arange(n), 2))
    config = _config(batch_size=n, learning_rate=1.0, dpsgd_noise_multiplier=sigma, dpsgd_clip=clip)
    steps, _ = train_dp_sgd(Zero(), model, data, config)
    assert steps == 1
    noise = torch.cat(
        [((s - p.detach()) * n).flatten() for s, p in zip(start, model.parameters(), strict=True)]
    ).double()
    assert noise.numel() == 20_050
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.03)
    assert abs(float(noise.mean())) < 5 * sigma * clip / math.sqrt(noise.numel())


def test_same_seed_same_weights_and_the_secret_changes_the_noise():
    data, *_ = _toy(seed=2, patients=12)
    config = _config(batch_size=4, local_epochs=2, learning_rate=0.1, dpsgd_noise_multiplier=1.0)
    config = dataclasses.replace(config, dpsgd_clip=1.0, optimizer="adam")

    def run(**kw) -> np.ndarray:
        model = _linear(3)
        train_dp_sgd(Squares(), model, data, kw.pop("config", config), **kw)
        return model.weight.detach().numpy().copy()

    first = run()
    assert np.array_equal(first, run())
    assert not np.array_equal(first, run(config=dataclasses.replace(config, seed=6)))
    secret = run(secret=b"site-only")
    assert np.array_equal(secret, run(secret=b"site-only"))
    assert not np.array_equal(first, secret)


def test_scaffold_correction_and_configuration_errors():
    """The correction (data-independent) is added after the noise: with zero gradients and no
    noise, SGD at lr 0.1 moves a weight by -0.1 * correction."""
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = UnitDataset(torch.zeros(3, 2), units=np.arange(3))
    config = _config(batch_size=3, learning_rate=0.1, dpsgd_noise_multiplier=0.0)
    train_dp_sgd(Zero(), model, data, config, {"weight": [[0.5, -1.0]]})
    np.testing.assert_allclose(model.weight.detach().numpy(), [[-0.05, 0.1]], rtol=1e-6)
    for bad in ({"dpsgd_clip": 0.0}, {"dpsgd_noise_multiplier": -1.0}, {"optimizer": "rmsprop"}):
        with pytest.raises(ValueError):
            train_dp_sgd(Zero(), model, data, dataclasses.replace(config, **bad))
    with pytest.raises(ValueError, match="batch normalisation"):
        bn = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        train_dp_sgd(Zero(), bn, data, config)


def test_train_local_dispatches_on_the_noise_multiplier():
    data, *_ = _toy()
    config = _config(batch_size=3, learning_rate=0.1, dpsgd_noise_multiplier=0.0)
    steps, metrics = train_local(Squares(), _linear(3), data, config)
    assert set(metrics) == {"train_loss"} and steps == math.ceil(len(data) / 3)
    dp = dataclasses.replace(config, dpsgd_noise_multiplier=0.8)
    steps, metrics = train_local(Squares(), _linear(3), data, dp)
    assert "train_loss" not in metrics  # no un-noised statistic of the data
    assert dpsgd_event_from_metrics(metrics) == planned_dpsgd_event(0.8, 3, 6, 1)
    assert steps == 2


# ---- the patient twin ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twin():
    """One synthetic site of 150 patients (site-3's profile)."""
    schema = parse_schema(cohort_schema())
    task = task_for(schema)
    profile = dataclasses.replace(DEFAULT_SITES[2], n_patients=150)
    cohort = generate_cohort(CohortConfig(seed=7, sites=(profile,)))
    frame = check_frame(schema, cohort.site(profile.site_id))
    prepared = task.prepare(frame, 0.2, 0)
    moments = {m.column: m for m in prepared.moments}
    return task, frame, prepared, moments


def test_twin_training_rows_carry_their_patient(twin):
    _task, frame, prepared, _ = twin
    data = prepared.train
    assert isinstance(data, UnitDataset) and data.units.dtype == torch.long
    numeric, _cat, arm, history, mask, _target, _ctx, _y = data.tensors
    units = data.units
    n = int(units.max()) + 1
    assert sorted(units.unique().tolist()) == list(range(n))
    # rows of one patient share its baseline (covariates, arm, baseline value); patients differ
    keys = torch.cat([numeric, arm[:, None], history[:, :1]], 1).numpy()
    per_patient = [{tuple(r) for r in keys[(units == k).numpy()]} for k in range(n)]
    assert all(len(s) == 1 for s in per_patient)
    assert len(set().union(*per_patient)) == n
    # a patient's row count: its observed visits after baseline
    counts = torch.bincount(units, minlength=n).numpy()
    by_key = {next(iter(s)): c for s, c in zip(per_patient, counts, strict=True)}
    observed = frame[(frame["visit"] > 0) & frame["y"].notna()].groupby("patient_id").size()
    base = frame[frame["visit"] == 0].set_index("patient_id")
    for pid, count in observed.items():
        key = (
            np.float32(base.at[pid, "age"]),
            np.float32(base.at[pid, "bmi"]),
            np.float32(base.at[pid, "arm"]),
            np.float32(base.at[pid, "y"]),
        )
        if key in by_key:  # a training patient
            assert by_key[key] == count
    assert sum(by_key.values()) == len(data) and len(by_key) == n


def test_twin_vmap_and_loop_agree(twin):
    task, _frame, prepared, moments = twin
    model = task.build_model(moments, seed=0)
    rows = tuple(t[:120] for t in prepared.train.tensors)
    units = row_units(prepared.train)[:120]
    n = int(units.max()) + 1
    fast = per_patient_gradients(task, model, rows, units, n, "vmap")
    slow = per_patient_gradients(task, model, rows, units, n, "loop")
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_twin_trains_under_dp_sgd_and_reports_the_events(twin):
    """sigma 0.5, clip 1: the full training loss falls (measured: -0.10 -> -0.94 with this
    seed); the metrics are the event that planned_dpsgd_event predicts."""
    task, _frame, prepared, moments = twin
    model = task.build_model(moments, seed=0)
    start = weights_of(model)

    def full_loss() -> float:
        with torch.no_grad():
            return float(task.loss(model, prepared.train.tensors))

    before = full_loss()
    config = TrainConfig(
        local_epochs=10,
        batch_size=32,
        learning_rate=1e-2,
        seed=3,
        dpsgd_noise_multiplier=0.5,
        dpsgd_clip=1.0,
    )
    steps, metrics = train_local(task, model, prepared.train, config)
    after = full_loss()
    assert after < before - 0.3
    n_patients = int(prepared.train.units.max()) + 1
    assert metrics["dpsgd_patients"] == n_patients
    event = dpsgd_event_from_metrics(metrics)
    assert event == planned_dpsgd_event(0.5, 32, n_patients, 10)
    assert steps == event.steps == 10 * math.ceil(n_patients / 32)
    assert math.isfinite(epsilon([event], 1e-5)) and epsilon([event], 1e-5) > 1
    # deterministic: the same seed again gives the same weights
    trained = weights_of(model)
    load_weights_into(model, start)
    train_local(task, model, prepared.train, config)
    again = weights_of(model)
    assert all(np.array_equal(trained[k], again[k]) for k in trained)


def test_a_tabular_row_is_its_own_unit():
    """The tabular task's ids are unique per row (check_frame refuses duplicates): its
    training set stays a plain TensorDataset, and every row is a unit."""
    features = [{"name": "x1"}]
    doc = {"task": "tabular", "problem": "regression", "features": features, "target": "y"}
    schema = parse_schema(doc | {"id_column": "pid"})
    frame = pd.DataFrame({"pid": [f"p{i}" for i in range(30)], "x1": np.arange(30.0), "y": 1.0})
    data = task_for(schema).prepare(check_frame(schema, frame), 0.2, 0).train
    assert not isinstance(data, UnitDataset)
    assert torch.equal(row_units(data), torch.arange(len(data)))


def test_local_steps_under_dp_sgd_are_what_the_plan_books():
    data, *_ = _toy()
    config = _config(batch_size=3, learning_rate=0.1, dpsgd_noise_multiplier=0.8, local_steps=5)
    steps, metrics = train_local(Squares(), _linear(3), data, config)
    assert steps == 5
    assert dpsgd_event_from_metrics(metrics) == planned_dpsgd_event(0.8, 3, 6, 1, local_steps=5)
