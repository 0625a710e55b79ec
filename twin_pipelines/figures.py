"""PNG figures of the twin's evaluation: error and coverage by horizon, and forecast versus
observed trajectories of synthetic patients. Shown in Dagster (inline) and kept in MLflow."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from twin_core.twin_report import TwinReport


def _figure(**kwargs):
    """A figure of its own on an Agg canvas, without pyplot: no global backend switch (a
    notebook or any other user of pyplot in the process keeps its own) and no figure registry
    to close. The same PNG bytes as through pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def horizon_figure(report: TwinReport, path: Path, title: str = "") -> Path:
    """MAE by horizon (twin, oracle, last value, noise floor) and 90 % interval coverage."""
    rows = report.horizons
    h = [r.horizon for r in rows]
    fig = _figure(figsize=(8.4, 3.2))
    left, right = fig.subplots(1, 2)
    left.plot(h, [r.mae for r in rows], marker="o", label="twin")
    if all(r.oracle_mae is not None for r in rows):
        left.plot(h, [r.oracle_mae for r in rows], marker="s", ls="--", label="oracle")
    left.plot(h, [r.naive_mae for r in rows], marker=".", ls=":", label="last value")
    if all(r.baseline_mae is not None for r in rows):
        left.plot(h, [r.baseline_mae for r in rows], marker="^", label="twin, from baseline")
    if all(r.oracle_baseline_mae is not None for r in rows):
        left.plot(
            h, [r.oracle_baseline_mae for r in rows], ls="--", marker="v", label="oracle, baseline"
        )
    if report.noise_floor:
        left.axhline(report.noise_floor, color="grey", lw=0.8, label="noise floor")
    left.set_xlabel("horizon (visits ahead)")
    left.set_ylabel("MAE")
    left.legend(fontsize=7)
    right.axhspan(0.85, 0.95, color="tab:green", alpha=0.12, label="0.85-0.95")
    right.axhline(0.9, color="grey", lw=0.8)
    right.plot(h, [r.coverage90 for r in rows], marker="o", label="twin")
    if all(r.oracle_coverage90 is not None for r in rows):
        right.plot(h, [r.oracle_coverage90 for r in rows], marker="s", ls="--", label="oracle")
    right.set_ylim(0.5, 1.0)
    right.set_xlabel("horizon (visits ahead)")
    right.set_ylabel("90 % interval coverage")
    right.legend(fontsize=7, loc="lower left")
    fig.suptitle(title or "forecast error and calibration by horizon", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def trajectory_figure(
    forecasts: dict, labels: list[str], path: Path, latent: np.ndarray | None = None
) -> Path:
    """Forecast from baseline (line, 90 % band) against the observed visits (dots) and, for
    synthetic patients, the true course (dashed), one panel per patient."""
    n = len(labels)
    fig = _figure(figsize=(2.6 * n, 2.7))
    axes = fig.subplots(1, n, sharey=False, squeeze=False)
    visits = np.arange(forecasts["mean"].shape[1])
    for i, (ax, label) in enumerate(zip(axes[0], labels, strict=True)):
        ax.fill_between(visits, forecasts["low"][i], forecasts["high"][i], alpha=0.2)
        ax.plot(visits, forecasts["mean"][i], label="twin forecast")
        if latent is not None:
            ax.plot(visits, latent[i], ls="--", color="grey", lw=1, label="true course")
        ax.plot(visits, forecasts["observed"][i], "o", color="black", ms=3, label="observed")
        arm = "treated" if forecasts["arm"][i] else "control"
        ax.set_title(f"{label} ({arm})", fontsize=8)
        ax.set_xlabel("visit")
    axes[0][0].set_ylabel("outcome")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def inline_markdown(path: Path, alt: str) -> str:
    """The PNG as markdown with an inline image, which the Dagster UI renders in metadata."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"
