"""The model card a governance reviewer reads on a registered version (markdown)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from twin_core.federation import SiteFailure

_FORECASTS = {
    "patient_twin": (
        "A patient twin: a Gaussian forecast (mean and variance) of a patient's later visits "
        "from baseline covariates, treatment arm and the observed visit history (a learnt "
        "random-intercept, random-slope course updated by Bayes' rule, corrected by an MLP); "
        "rolled forward from baseline it gives a whole trajectory, and at arm 0 the control "
        "twin, the prognostic score of PROCOVA."
    ),
    "tabular": "A tabular model: the declared target from the declared feature columns.",
}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def model_card(
    *,
    model_name: str,
    task: str,
    round_key: str,
    strategy: str,
    site_examples: Mapping[str, int],
    pooled: Mapping[str, float],
    per_site: Mapping[str, Mapping[str, float]],
    failures: Sequence[SiteFailure],
    schema_fingerprint: str,
    dagster_run_id: str,
    champion_loss: float | None,
    promoted: bool,
    decision_reasons: Sequence[str] = (),
    review: str = "automatic",
    site_status: Mapping[str, Mapping[str, object]] | None = None,
    fitness: Mapping | None = None,
    privacy: Mapping | None = None,
) -> str:
    # per-horizon figures are in the fitness section (and the round's artifacts), not here
    metric_names = sorted(
        k
        for k in {k for m in per_site.values() for k in m} | set(pooled)
        if not re.search(r"_h\d+$", k) or k == "mae_h1"
    )
    lines = [
        f"# {model_name}, round {round_key}",
        "",
        f"**What it forecasts.** {_FORECASTS.get(task, task)}",
        "",
        f"**How it was trained.** Federated: {strategy} over {len(site_examples)} site(s); no "
        "patient row left any site. Only weights, counts and aggregate statistics were exchanged.",
        f"Dagster run `{dagster_run_id}`; data schema `{schema_fingerprint}`.",
        "",
        "## Sites in training",
        "",
        "| site | training examples |",
        "|---|---|",
        *(f"| {s} | {n} |" for s, n in sorted(site_examples.items())),
    ]
    if failures:
        lines += ["", "Sites that contributed nothing this round:", ""]
        lines += [f"- {f.site_id} ({f.stage}): {f.code}: {f.reason}" for f in failures]
    header = "| | " + " | ".join(metric_names) + " |"
    lines += [
        "",
        "## Validation (holdout split of each site)",
        "",
        header,
        "|---" * (len(metric_names) + 1) + "|",
    ]
    lines.append(
        "| **pooled** | "
        + " | ".join(_fmt(pooled[k]) if k in pooled else "" for k in metric_names)
        + " |"
    )
    for site_id, metrics in sorted(per_site.items()):
        lines.append(
            f"| {site_id} | "
            + " | ".join(_fmt(metrics[k]) if k in metrics else "" for k in metric_names)
            + " |"
        )
    if site_status:
        lines += [
            "",
            "## Data checks and drift at each site (as reported by the site)",
            "",
            "| site | data check | score | drift |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {site} | {st.get('data_check', '')} | {st.get('data_check_score', '')} "
            f"| {st.get('drift', '')} |"
            for site, st in sorted(site_status.items())
        ]
    if fitness:
        lines += ["", *fitness_section(fitness)]
    if privacy:
        lines += ["", *privacy_section(privacy)]
    if review == "manual":
        verdict = "registered as **challenger**, pending a reviewer's decision (review_job)"
    elif promoted:
        verdict = "promoted to **champion** by the automatic policy"
    else:
        verdict = "registered as **challenger**; the champion stays"
    before = (
        "no champion before"
        if champion_loss is None
        else f"champion's pooled loss was {_fmt(champion_loss)}"
    )
    lines += [
        "",
        "## Promotion",
        "",
        "Passed every gate (finite weights, quorum, no pooled regression); "
        f"{verdict} ({before}). Policy: " + ("; ".join(decision_reasons) or "n/a") + ".",
        "",
        "## Known limitations",
        "",
        "- Validated on each site's own holdout split, not on sites outside the federation.",
        "- Sites with few patients weigh little in FedAvg and may be served worse than large "
        "sites; check the per-site rows above.",
        "- Metrics describe the data the sites hold now; drift at a site can invalidate them.",
    ]
    return "\n".join(lines)


def fitness_section(report: Mapping) -> list[str]:
    """Markdown of a TwinReport.as_dict(): fit for trial simulation?"""
    lines = [
        "## Fitness for trial simulation",
        "",
        f"90 % prediction intervals cover {report['coverage90']:.3f} of observed visits "
        "(every horizon, pooled; nominal 0.90).",
        "",
        "Horizon h: h visits ahead of each observed visit; *from baseline*: visit h forecast "
        "from the baseline visit alone.",
        "",
        "| horizon | MAE | RMSE | coverage 90 % | last value MAE | oracle MAE | MAE / oracle "
        "| MAE from baseline | oracle, from baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["horizons"]:
        oracle = "" if r["oracle_mae"] is None else _fmt(r["oracle_mae"])
        ratio = "" if r["vs_oracle"] is None else _fmt(r["vs_oracle"])
        base = "" if r.get("baseline_mae") is None else _fmt(r["baseline_mae"])
        oracle_base = "" if r.get("oracle_baseline_mae") is None else _fmt(r["oracle_baseline_mae"])
        lines.append(
            f"| {r['horizon']} | {_fmt(r['mae'])} | {_fmt(r['rmse'])} | {r['coverage90']:.3f} "
            f"| {_fmt(r['naive_mae'])} | {oracle} | {ratio} | {base} | {oracle_base} |"
        )
    lines += [
        "",
        "| treatment effect at the last visit | estimate | SE | 95 % CI | truth | bias |",
        "|---|---|---|---|---|---|",
    ]
    for e in report["effects"]:
        low, high = e["ci95"]
        truth = "" if e["truth"] is None else _fmt(e["truth"])
        bias = "" if e["bias"] is None else f"{e['bias']:+.3g}"
        lines.append(
            f"| {e['method']} | {_fmt(e['estimate'])} | {_fmt(e['se'])} "
            f"| {_fmt(low)} to {_fmt(high)} | {truth} | {bias} |"
        )
    if report.get("variance_ratio") is not None:
        lines += [
            "",
            f"PROCOVA variance ratio {report['variance_ratio']:.3f}: with the twin as prognostic "
            f"score a trial needs about {report['variance_ratio']:.0%} of the patients for the "
            "same precision.",
        ]
    if not report.get("truth_known"):
        lines += ["", "No ground truth for these data: bias against the true effect is unknown."]
    return lines


def privacy_section(privacy: Mapping) -> list[str]:
    """How the data behind this version was protected, and the privacy spent on it so far.

    `privacy`: the round's settings (transport, secure_aggregation, dp_fedavg, dp_sgd, delta,
    budget, campaign) and `spent`: {scope: {"epsilon": all campaigns, "campaigns": {...}}}
    from the federation's privacy ledger."""
    lines = [
        "## Privacy",
        "",
        f"- Transport: {privacy.get('transport', 'unknown')}.",
        "- Secure aggregation: "
        + (
            "on. The orchestrator saw only the sum of the sites' updates (pairwise masks, "
            "Bonawitz et al. 2017)."
            if privacy.get("secure_aggregation")
            else "off. The orchestrator saw each site's update (never its rows)."
        ),
    ]
    fed, sgd = privacy.get("dp_fedavg"), privacy.get("dp_sgd")
    if fed:
        lines.append(
            f"- Site-level DP-FedAvg: each update clipped to L2 norm {fed['clip']:g}, Gaussian "
            f"noise of multiplier {fed['noise_multiplier']:g} on their sum."
        )
    if sgd:
        lines.append(
            f"- Patient-level DP-SGD at every site: each patient's gradient clipped to "
            f"{sgd['clip']:g}, noise multiplier {sgd['noise_multiplier']:g}."
        )
    if not fed and not sgd:
        lines.append("- Differential privacy: off (no epsilon guarantee for this version).")
    spent = privacy.get("spent") or {}
    if spent:
        delta = privacy.get("delta")
        budget = privacy.get("budget")
        campaign = privacy.get("campaign", "")
        lines += [
            "",
            f"Epsilon spent at delta {delta:g} (Renyi-DP accountant), as of this round"
            + (f"; budget {budget:g} per scope" if budget else "; no budget set")
            + ":",
            "",
            f"| scope | epsilon, all campaigns | epsilon, campaign {campaign} |",
            "|---|---|---|",
            *(
                f"| {scope} | {entry['epsilon']:.3f} | "
                f"{entry.get('campaigns', {}).get(campaign, 0.0):.3f} |"
                for scope, entry in sorted(spent.items())
            ),
        ]
    return lines
