"""The twin's evaluation: its course layer by hand, forecasts by horizon, the oracle beside it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from twin_core.cohort import CohortConfig, cohort_schema, generate_cohort
from twin_core.effects import effect_statistics
from twin_core.federation import TrainConfig, pool_moments
from twin_core.oracle import Oracle
from twin_core.rounds import pool_evaluations
from twin_core.schema import check_frame, parse_schema
from twin_core.tasks import task_for
from twin_core.tasks.patient_twin import (
    _T_SAMPLES,
    SAMPLES,
    Z90,
    PathRequest,
    TwinHoldout,
    patient_draws,
    site_context,
    site_noise_sd,
)
from twin_core.training import evaluate, train_local

SITES = ("site-2", "site-3")


@pytest.fixture(scope="module")
def setting():
    cohort = generate_cohort(CohortConfig(seed=11))
    schema = parse_schema(cohort_schema())
    tasks = {s: task_for(schema, Oracle.from_summary(cohort.summary, s)) for s in SITES}
    prepared = {s: tasks[s].prepare(check_frame(schema, cohort.site(s)), 0.3, 0) for s in SITES}
    plain = task_for(schema)
    model = plain.build_model(pool_moments(p.moments for p in prepared.values()), seed=3)
    for s in SITES:
        train_local(plain, model, prepared[s].train, TrainConfig(3, 32, 3e-3, seed=1))
    return cohort, schema, tasks, plain, prepared, model


def test_course_layer_is_bayes_rule_by_hand(setting):
    """With the MLP's output at zero, the twin's forecast is the posterior predictive of its
    learnt line prior, which conditioning the joint normal of the visits reproduces."""
    _, _, _, plain, prepared, model = setting
    model = type(model)(2, 2, 6, (64, 64))  # a copy, its MLP silenced
    model.load_state_dict(setting[-1].state_dict())
    with torch.no_grad():
        model.net[-1].weight.zero_()
        model.net[-1].bias.zero_()
    *inputs, _y = (t[:40] for t in prepared["site-2"].holdout.next_visit)
    with torch.no_grad():
        mean_s, log_var_s = model(*inputs)
    numeric, categorical, arm, history, mask, target, context = inputs
    course = model.course
    x = torch.nan_to_num((numeric - model.numeric_mean) / model.numeric_std)
    with torch.no_grad():
        site = model.standardise_context(context)
        mu = course.prior_mean(torch.cat([x, categorical, arm.unsqueeze(1), site], 1)).double()
        sd = torch.exp(course.log_sd).double()
        r = float(torch.tanh(course.correlation)[0]) * 0.99
    prior = np.array([[sd[0] ** 2, r * sd[0] * sd[1]], [r * sd[0] * sd[1], sd[1] ** 2]])
    h = ((history - model.target_mean) / model.target_std).double().numpy()
    sigma2 = (context[:, 0] / model.target_std).double().numpy() ** 2
    for i in range(len(target)):
        seen = np.nonzero(mask[i].numpy())[0]
        times = np.r_[seen, target[i].item()] / 6.0
        design = np.stack([np.ones_like(times), times], 1)
        joint = design @ prior @ design.T + sigma2[i] * np.eye(len(times))
        means = design @ mu[i].numpy()
        c_oo, c_to = joint[:-1, :-1], joint[-1, :-1]
        expected = means[-1] + c_to @ np.linalg.solve(c_oo, h[i, seen] - means[:-1])
        variance = joint[-1, -1] - c_to @ np.linalg.solve(c_oo, c_to)
        assert float(mean_s[i]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert math.exp(float(log_var_s[i])) == pytest.approx(variance, rel=1e-4)


def test_site_noise_is_the_spread_around_each_patients_line():
    rng = np.random.default_rng(0)
    t = np.arange(7.0)
    lines = rng.normal(20, 3, (500, 1)) + rng.normal(1, 0.5, (500, 1)) * t
    y = lines + rng.normal(0, 0.7, lines.shape)
    y[rng.random(y.shape) < 0.2] = np.nan
    y[:, 0] = lines[:, 0]
    assert site_noise_sd(y) == pytest.approx(0.7, rel=0.05)
    assert math.isnan(site_noise_sd(y[:, :2]))  # nobody with three visits


def test_site_context_is_noise_level_and_slope():
    rng = np.random.default_rng(1)
    t = np.arange(7.0)
    y = rng.normal(20, 3, (800, 1)) + rng.normal(1.5, 0.3, (800, 1)) * t
    y = y + rng.normal(0, 0.5, y.shape)
    gone = rng.random(y.shape) < 0.3
    gone[:, 0] = False  # the baseline is always observed
    y[gone] = np.nan
    noise, level, slope = site_context(y)
    assert noise == pytest.approx(0.5, rel=0.06)
    assert level == pytest.approx(float(y[:, 0].mean()))
    assert slope == pytest.approx(1.5, abs=0.05)
    # one visit per patient: no slope, the spread of y stands in for the noise
    single = np.full((5, 7), np.nan)
    single[:, 0] = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert site_context(single) == (pytest.approx(np.std([1, 2, 3, 4, 5])), 3.0, 0.0)


def test_draws_are_fixed_per_patient():
    a = patient_draws(np.array(["p1", "p2", "p3"]), 7)
    b = patient_draws(np.array(["p3", "p1"]), 7)
    assert a.shape == (3, SAMPLES, 7)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


def test_statistics_add_up_across_sites_with_the_oracle(setting):
    cohort, schema, tasks, plain, prepared, model = setting
    # one site's oracle on both halves of that site's holdout: sums add exactly
    task, holdout = tasks["site-3"], prepared["site-3"].holdout
    n = len(holdout.arm)
    halves = [
        TwinHoldout(
            tuple(t for t in holdout.next_visit),
            *(t[sl] for t in (holdout.numeric, holdout.categorical, holdout.arm, holdout.context)),
            holdout.trajectory[sl],
            {k: v[sl] for k, v in holdout.covariates.items()},
            holdout.draws[sl],
        )
        for sl in (slice(0, n // 2), slice(n // 2, n))
    ]
    whole = evaluate(task, model, holdout)
    parts = [evaluate(task, model, h) for h in halves]
    for key in task.statistic_names:
        if key.startswith(("h", "b", "oracle", "traj", "eff")):
            assert parts[0][key] + parts[1][key] == pytest.approx(whole[key], rel=1e-5), key
    assert whole["oracle_points"] == sum(whole[f"h{h}_n"] for h in range(1, 7)) > 0


def test_metrics_put_the_oracle_beside_the_twin(setting):
    cohort, schema, tasks, plain, prepared, model = setting
    stats = {s: evaluate(tasks[s], model, prepared[s].holdout) for s in SITES}
    metrics = plain.metrics(stats["site-3"])
    for h in range(1, 7):
        assert 0.0 <= metrics[f"coverage90_h{h}"] <= 1.0
        assert metrics[f"oracle_mae_h{h}"] <= metrics[f"naive_mae_h{h}"]
        assert metrics[f"rmse_h{h}"] >= metrics[f"mae_h{h}"]
    assert metrics["noise_floor"] == pytest.approx(1.0 * math.sqrt(2 / math.pi))
    assert metrics["mae_h1_vs_oracle"] == metrics["mae_h1"] / metrics["oracle_mae_h1"]
    assert metrics["oracle_mae_h1"] > metrics["noise_floor"]
    # pooled over sites, the oracle's figures still add up
    pooled = pool_evaluations(
        plain,
        {
            s: type("E", (), {"statistics": stats[s], "num_examples": 1})()  # minimal evaluation
            for s in SITES
        },
    ).pooled
    count = stats["site-2"]["h1_n"] + stats["site-3"]["h1_n"]
    expected = (stats["site-2"]["h1_oracle_abs"] + stats["site-3"]["h1_oracle_abs"]) / count
    assert pooled["oracle_mae_h1"] == pytest.approx(expected)


def test_no_oracle_figures_unless_every_site_had_the_truth(setting):
    cohort, schema, tasks, plain, prepared, model = setting
    with_truth = evaluate(tasks["site-2"], model, prepared["site-2"].holdout)
    without = evaluate(plain, model, prepared["site-3"].holdout)
    assert without["oracle_points"] == 0 and without["h1_oracle_abs"] == 0
    assert "oracle_mae_h1" not in plain.metrics(without)
    mixed = {k: with_truth[k] + without[k] for k in plain.statistic_names}
    metrics = plain.metrics(mixed)
    assert "oracle_mae_h1" not in metrics and "noise_floor" not in metrics
    assert "mae_h1" in metrics and "naive_mae_h1" in metrics


def test_evaluation_is_deterministic(setting):
    _, _, tasks, _, prepared, model = setting
    a = evaluate(tasks["site-2"], model, prepared["site-2"].holdout)
    b = evaluate(tasks["site-2"], model, prepared["site-2"].holdout)
    assert a == b


# -- the evaluation against a straightforward reference ----------------------------------------
# The statistics as they were first written: from every origin, 1 + SAMPLES copies of every
# patient observed there rolled forward one forward pass per visit, every visit, every copy;
# the effects from two more roll-outs of everyone. The task rolls forward only what a statistic
# reads, all requests together; the numbers must not move. (Observed: every key bit-equal but
# eff_my, one float64 ulp off: numpy's dot over a strided column; rtol 1e-6 leaves room for
# GEMMs over other row counts to round float32 differently on other BLAS builds.)


def _reference_paths(task, model, holdout, rows, origin, arm, samples):
    y = holdout.trajectory[rows]
    n, width = len(rows), task.horizon + 1
    observed = torch.isfinite(y) & (torch.arange(width)[None, :] <= origin)
    history = torch.where(observed, y, 0.0).float().repeat(1 + samples, 1)
    mask = observed.float().repeat(1 + samples, 1)

    def block(t):
        return t[rows].repeat(1 + samples, *([1] * (t.dim() - 1)))

    numeric, categorical, context = (
        block(holdout.numeric),
        block(holdout.categorical),
        block(holdout.context),
    )
    arm = arm[rows].repeat(1 + samples)
    draws = holdout.draws[rows, :samples].transpose(0, 1).reshape(samples * n, width)
    first_sd = torch.zeros(n)
    for visit in range(origin + 1, width):
        target = torch.full((len(arm),), visit, dtype=torch.long)
        with torch.enable_grad():  # the plain modules (no in-place ReLU)
            mean, sd = (
                t.detach()
                for t in model.forecast(numeric, categorical, arm, history, mask, target, context)
            )
        draw = mean[n:] + sd[n:] * draws[:, visit]
        history[:, visit] = torch.cat([mean[:n], draw])
        mask[:, visit] = 1.0
        if visit == origin + 1:
            first_sd = sd[:n]
    paths = history.double().view(1 + samples, n, width)
    return paths[0], (paths[1:] if samples else None), first_sd.double()


def _reference_oracle(task, holdout, rows, observed, visit):
    idx = rows.numpy()
    y = holdout.trajectory[rows].numpy()
    return task.oracle.forecast(
        {k: v[idx] for k, v in holdout.covariates.items()},
        holdout.arm.double().numpy()[idx],
        np.where(observed.numpy(), y, 0.0),
        observed.numpy(),
        np.full(len(idx), visit),
    )


def _reference_horizon(task, model, holdout):
    y = holdout.trajectory
    width = task.horizon + 1
    out: dict[str, float] = {}

    def add(key, value):
        out[key] = out.get(key, 0.0) + value

    oracle_points = 0.0
    for origin in range(task.horizon):
        rows = torch.nonzero(torch.isfinite(y[:, origin])).squeeze(1)
        if not len(rows):
            continue
        mean_path, sampled, first_sd = _reference_paths(
            task, model, holdout, rows, origin, holdout.arm, SAMPLES
        )
        observed = torch.isfinite(y[rows]) & (torch.arange(width)[None, :] <= origin)
        for visit in range(origin + 1, width):
            h, target = visit - origin, y[rows, visit]
            seen = torch.isfinite(target)
            if not seen.any():
                continue
            err = (target - mean_path[:, visit])[seen]
            if h == 1:
                spread = first_sd[seen]
                covered = err.abs() <= Z90 * spread
            else:
                draws = sampled[:, :, visit][:, seen]
                centre, spread = draws.mean(0), draws.std(0)
                covered = (target[seen] - centre).abs() <= _T_SAMPLES * spread
            naive = y[rows, origin][seen]
            add(f"h{h}_n", float(seen.sum()))
            add(f"h{h}_abs", float(err.abs().sum()))
            add(f"h{h}_sq", float((err**2).sum()))
            add(f"h{h}_cov", float(covered.sum()))
            add(f"h{h}_naive_abs", float((target[seen] - naive).abs().sum()))
            if task.oracle is not None:
                o = _reference_oracle(task, holdout, rows[seen], observed[seen], visit)
                o_err = target[seen].numpy() - o.mean
                add(f"h{h}_oracle_abs", float(np.abs(o_err).sum()))
                add(f"h{h}_oracle_sq", float((o_err**2).sum()))
                add(f"h{h}_oracle_cov", float((np.abs(o_err) <= Z90 * o.sd).sum()))
                oracle_points += float(seen.sum())
                if h == 1:
                    add("oracle_floor", task.oracle.noise_floor * float(seen.sum()))
                if origin == 0:
                    add(f"b{h}_oracle_abs", float(np.abs(o_err).sum()))
            if origin == 0:
                add(f"b{h}_n", float(seen.sum()))
                add(f"b{h}_abs", float(err.abs().sum()))
                add(f"b{h}_sq", float((err**2).sum()))
                add("traj_abs2", float((err**2).sum()))
                z = err.abs() / spread.clamp_min(1e-9)
                add("traj_z", float(z.sum()))
                add("traj_z2", float((z**2).sum()))
    out["oracle_points"] = oracle_points
    return out


def _reference_effects(task, model, holdout):
    y = holdout.trajectory
    everyone = torch.arange(len(y))
    arm = holdout.arm
    control, *_ = _reference_paths(task, model, holdout, everyone, 0, torch.zeros_like(arm), 0)
    treated, *_ = _reference_paths(task, model, holdout, everyone, 0, torch.ones_like(arm), 0)
    final = torch.isfinite(y[:, -1])
    return effect_statistics(
        arm.double()[final].numpy(),
        control[final, -1].numpy(),
        y[final, -1].numpy(),
        (treated - control)[final, -1].numpy(),
    )


def _reference_statistics(task, model, holdout):
    model.eval()
    with torch.no_grad():
        stats = dict.fromkeys(task.statistic_names, 0.0)
        *inputs, y = holdout.next_visit
        mean, sd = (t.double() for t in model.forecast(*inputs))
        err = y.double() - mean
        nll = 0.5 * math.log(2 * math.pi) + torch.log(sd) + 0.5 * (err / sd) ** 2
        stats.update(
            n=float(len(y)),
            sum_nll=float(nll.sum()),
            sum_abs=float(err.abs().sum()),
            sum_sq=float((err**2).sum()),
            n_covered90=float((err.abs() <= Z90 * sd).sum()),
        )
        stats.update(_reference_horizon(task, model, holdout))
        stats.update(_reference_effects(task, model, holdout))
    return stats


COUNTS = ("n", "n_covered90", "oracle_points") + tuple(
    f"{p}{h}_{k}" for p in "hb" for h in range(1, 7) for k in ("n", "cov", "oracle_cov")
)


@pytest.fixture(scope="module")
def twins(setting):
    """The trained default twin (hidden 64, 64) and a ~100 k parameter one (300, 300), trained
    briefly on the same site."""
    cohort, schema, tasks, plain, prepared, model = setting
    big_schema = dataclasses.replace(schema, hidden=(300, 300))
    big = task_for(big_schema).build_model(pool_moments(p.moments for p in prepared.values()), 5)
    train_local(plain, big, prepared["site-2"].train, TrainConfig(1, 32, 1e-3, seed=2))
    assert 90_000 < sum(p.numel() for p in big.parameters()) < 110_000
    return {"default": model, "100k": big}


def _with_dropout(holdout: TwinHoldout) -> TwinHoldout:
    """The holdout with more patients gone (seeded): a third drop out after a random visit
    (some right after baseline), and one in eight later visits is missed."""
    rng = np.random.default_rng(4)
    y = holdout.trajectory.clone()
    n = len(y)
    gone = rng.random(n) < 1 / 3
    after = rng.integers(0, 6, n)
    for i in np.nonzero(gone)[0]:
        y[i, after[i] + 1 :] = math.nan
    missed = torch.from_numpy(rng.random(y.shape) < 1 / 8)
    missed[:, 0] = False
    y[missed] = math.nan
    return dataclasses.replace(holdout, trajectory=y)


@pytest.mark.parametrize("size", ["default", "100k"])
def test_statistics_match_the_reference_roll_out(setting, twins, size):
    _, _, tasks, _, prepared, _ = setting
    model, task = twins[size], tasks["site-2"]
    holdout = _with_dropout(
        TwinHoldout.concat(prepared["site-2"].holdout, prepared["site-3"].holdout)
    )
    y = holdout.trajectory
    # what the shortcuts skip: missed visits, dropout, patients with nothing after baseline
    last = (torch.isfinite(y) * torch.arange(7)).amax(1)
    assert torch.isnan(y[:, 1:-1]).any() and (last < 6).any() and (last == 0).any()
    got = evaluate(task, model, holdout)
    expected = _reference_statistics(task, model, holdout)
    assert set(got) == set(expected) == set(task.statistic_names)
    for key in task.statistic_names:
        if key in COUNTS:
            assert got[key] == expected[key], key
        else:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert got == evaluate(task, model, holdout)  # the same statistics, run twice


def test_baseline_paths_match_the_reference_roll_out(setting, twins):
    """The paths baseline_forecasts draws: every patient, every visit, SAMPLES copies."""
    _, _, tasks, plain, prepared, _ = setting
    holdout, model = prepared["site-3"].holdout, twins["100k"]
    n = len(holdout.arm)
    everyone = PathRequest(torch.arange(n), 0, holdout.arm, torch.full((n,), 6), SAMPLES)
    model.eval()
    with torch.no_grad():
        [(mean, sampled, first_sd)] = plain._paths(model, holdout, [everyone])
        expected = _reference_paths(plain, model, holdout, torch.arange(n), 0, holdout.arm, SAMPLES)
    for a, b in zip((mean, sampled, first_sd), expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=0.0)
