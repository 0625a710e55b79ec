"""Strategies chosen by name: weighting rules, stragglers, server optimiser state, dispatch."""

from __future__ import annotations

import numpy as np
import pytest

from twin_core.server_optimizers import ServerOptimizer
from twin_core.strategies import SiteContribution, Strategy, aggregate, planned_steps


def _site(name: str, examples: int, steps: int = 10, planned: int = 10, quality: float = 1.0):
    return SiteContribution(name, examples, steps, planned, quality)


def _w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float64)}


START = _w(0.0, 0.0)
UPDATES = [(_site("a", 10), _w(1.0, 2.0)), (_site("b", 30), _w(3.0, 6.0))]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fedavg", [2.5, 5.0]),  # (10 * 1 + 30 * 3) / 40
        ("fedavg_uniform", [2.0, 4.0]),
    ],
)
def test_weighted_strategies_by_hand(name, expected):
    model, state, _ = aggregate(Strategy(name), START, UPDATES)
    assert model["w"].tolist() == expected and state is None


def test_square_root_weights_by_hand():
    # 4 and 16 examples: weights 2 and 4 -> (2 * 1 + 4 * 3) / 6 = 7 / 3; a straggler that did
    # half its steps counts for half of its square root: weights 2 and 2 -> 2.0
    updates = [(_site("a", 4), _w(1.0)), (_site("b", 16), _w(3.0))]
    assert aggregate(Strategy("fedavg_sqrt"), _w(0.0), updates)[0]["w"].tolist() == (
        pytest.approx([7 / 3])
    )
    half = [(_site("a", 4), _w(1.0)), (_site("b", 16, steps=5, planned=10), _w(3.0))]
    assert aggregate(Strategy("fedavg_sqrt"), _w(0.0), half)[0]["w"].tolist() == (
        pytest.approx([2.0])
    )


def test_quality_and_partial_work_scale_a_site_s_weight():
    # b did half its planned steps (a straggler): weight 30 * 0.5 = 15 -> (10 + 45) / 25 = 2.2
    straggler = [(_site("a", 10), _w(1.0)), (_site("b", 30, steps=5, planned=10), _w(3.0))]
    assert aggregate(Strategy("fedavg"), _w(0.0), straggler)[0]["w"].tolist() == pytest.approx(
        [2.2]
    )
    # b's data check scored 0.5 -> the same weights under fedavg_quality
    quality = [(_site("a", 10), _w(1.0)), (_site("b", 30, quality=0.5), _w(3.0))]
    assert aggregate(Strategy("fedavg_quality"), _w(0.0), quality)[0][
        "w"
    ].tolist() == pytest.approx([2.2])
    assert planned_steps(2, 64, 130) == 6 and _site("x", 1, 12, 10).completion == 1.0


def test_server_optimiser_strategy_steps_from_the_fedavg_mean():
    strategy = Strategy("fedavgm", server=ServerOptimizer("fedavgm", lr=1.0, beta1=0.5))
    model, state, facts = aggregate(strategy, START, UPDATES)
    assert model["w"].tolist() == [2.5, 5.0] and facts == {"server_step": 1}
    # every site moves the model by +2.5 again; momentum 0.5: x = 2.5 + (0.5 * 2.5 + 2.5)
    again = [(site, {"w": model["w"] + 2.5}) for site, _ in UPDATES]
    model2, state2, _ = aggregate(strategy, model, again, state)
    assert model2["w"][0] == pytest.approx(2.5 + 0.5 * 2.5 + 2.5) and state2.step == 2


def test_robust_strategies_are_dispatched_and_need_individual_updates():
    updates = [(_site(n, 10), _w(v)) for n, v in (("a", 1.0), ("b", 2.0), ("c", 100.0))]
    assert aggregate(Strategy("median"), _w(0.0), updates)[0]["w"].tolist() == [2.0]
    assert (
        Strategy("median").needs_individual_updates
        and not Strategy("fedavg").needs_individual_updates
    )
    many = [
        (_site(n, 10), _w(v)) for n, v in zip("abcde", (1.0, 1.1, 0.9, 1.05, 50.0), strict=True)
    ]
    model, _, facts = aggregate(Strategy("krum", krum_f=1), _w(0.0), many)
    assert facts["selected"][0] in "abcd" and model["w"][0] < 2


def test_unknown_or_incomplete_strategies_are_refused():
    with pytest.raises(ValueError, match="unknown strategy 'fedmagic'"):
        Strategy("fedmagic")
    with pytest.raises(ValueError, match="needs its server optimiser settings"):
        Strategy("fedadam")


def test_scaffold_control_variates_by_hand():
    from twin_core import scaffold

    # option II: c_i+ = c_i - c + (x - y) / (K eta); c_i 0.1, c 0.3, x 1.0, y 0.4, K 3, eta 0.1
    new = scaffold.new_site_control(
        {"w": np.array([0.1], np.float32)},
        {"w": np.array([0.3])},
        {"w": np.array([1.0])},
        {"w": np.array([0.4])},
        3,
        0.1,
    )
    assert new["w"][0] == pytest.approx(0.1 - 0.3 + 0.6 / 0.3)
    # server: c + |S|/N mean(dc): 0.3 + 2/4 * mean(0.2, 0.6) = 0.5
    c = scaffold.server_control(
        {"w": np.array([0.3])}, [{"w": np.array([0.2])}, {"w": np.array([0.6])}], total_sites=4
    )
    assert c["w"][0] == pytest.approx(0.5)
    # the server model is the example-weighted mean of the sites' models (step size 1)
    updates = [
        (_site("a", 10), {"w": np.array([1.0]), "scaffold.dc/w": np.array([0.2])}),
        (_site("b", 90), {"w": np.array([3.0]), "scaffold.dc/w": np.array([0.6])}),
    ]
    model, state, _ = aggregate(Strategy("scaffold"), {"w": np.array([0.0])}, updates, None, 2)
    assert model["w"].tolist() == [2.8] and state.first["w"][0] == pytest.approx(0.4)
