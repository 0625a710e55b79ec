"""Expected outcomes of issue 4 on the default seed, on a small configuration of the
experiments (`twin experiment ...` runs the full ones)."""

from __future__ import annotations

from pathlib import Path

from twin_core.cohort import CohortConfig
from twin_pipelines import experiments as ex


def test_fedprox_beats_fedavg_under_heterogeneity_and_stragglers(tmp_path: Path):
    """8 local epochs on an amplified non-IID cohort: FedAvg's sites drift apart and its pooled
    loss climbs after round 2; FedProx's proximal term keeps it falling, and ahead by round 5."""
    curves = {}
    for label, settings in (("fedavg", {}), ("fedprox", {"proximal_mu": 1.0})):
        handlers = ex.site_handlers(CohortConfig(seed=7, sites=ex.HETEROGENEOUS_SITES))
        fleet = {s: ex.StragglerSite(h) if s in ex.STRAGGLERS else h for s, h in handlers.items()}
        config = {**ex.COMMON, **ex.HETEROGENEITY_LOCAL, "seed": 7, **settings}
        curves[label] = ex.run_arm(label, fleet, 5, config, tmp_path).pooled
    fedavg, fedprox = curves["fedavg"], curves["fedprox"]
    assert fedprox[-1] < fedavg[-1], curves
    assert fedavg[-1] > min(fedavg), curves  # client drift: FedAvg left its best round behind
    assert all(b < a for a, b in zip(fedprox, fedprox[1:], strict=False)), curves


def test_report_is_written_with_plot_table_and_settings(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ex, "POISONED_ARMS", {"median": {"strategy": "median"}})
    path = ex.write_report("poisoned", 1, 7, tmp_path)
    text = path.read_text()
    assert "![pooled and per-site loss per round](poisoned.png)" in text
    assert "| median, clean |" in text and "| median, attacked |" in text
    assert "Effect of the attack on each strategy's final pooled loss: median " in text
    assert "- seed: 7" in text and "- poisoned_site: site-4" in text
    assert (tmp_path / "poisoned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
