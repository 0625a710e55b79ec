"""`twin`: the embedded default in one command each.

twin demo [--rounds 3]   cohort -> 5 local site workers -> rounds through Dagster -> MLflow
twin ui                  site workers + MLflow UI + Dagster UI (dagster dev), until Ctrl-C
twin cohort OUT          write the synthetic cohort (site files, truth apart, schema)
twin experiment KIND     heterogeneity | poisoned | twin | privacy: re-runnable reports in
                         docs/experiments
twin pki init DIR [SITE...] / twin pki add-site DIR SITE   the federation's certificates
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from twin_pipelines.home import TwinHome

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "GX_ANALYTICS_ENABLED": "false",
}
DAGSTER_URL, MLFLOW_URL = "http://127.0.0.1:3000", "http://127.0.0.1:5000"


def _prepare_env(home: TwinHome) -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["TWIN_HOME"] = str(home.root)
    os.environ["DAGSTER_HOME"] = str(home.ensure_dagster_home())
    # The embedded default owns its registry: the demo, the Dagster UI and the MLflow UI must
    # all use the same store, whatever MLFLOW_TRACKING_URI the shell happens to hold.
    os.environ["MLFLOW_TRACKING_URI"] = home.tracking_uri
    home.mlflow_dir.mkdir(parents=True, exist_ok=True)


def _site_ids(n_sites: int) -> list[str]:
    """The demo's sites: the reference cohort's five (or the first n), or n simulated ones."""
    from twin_core.cohort import DEFAULT_SITES, simulated_sites

    if n_sites <= len(DEFAULT_SITES):
        return [s.site_id for s in DEFAULT_SITES[:n_sites]]
    return [s.site_id for s in simulated_sites(n_sites)]


def _ensure_cohort(home: TwinHome, seed: int, n_sites: int = 5) -> Path:
    """The synthetic cohort under TWIN_HOME: the reference five sites, or `n_sites` simulated
    ones (the reference profiles in turn) for a run at scale. Written again when it differs."""
    import json

    from twin_core.cohort import CohortConfig, generate_cohort, simulated_sites, write_cohort

    wanted = max(n_sites, 5)
    marker = home.cohort / "truth" / "summary.json"
    # a cohort written before the truth held each site's profile is written again
    current = json.loads(marker.read_text()) if marker.exists() else {}
    sites = current.get("sites", {})
    if (
        len(sites) != wanted
        or current.get("seed") != seed
        or not all("profile" in v for v in sites.values())
    ):
        if (home.cohort / "sites").exists():
            shutil.rmtree(home.cohort / "sites")
        config = CohortConfig(seed=seed, sites=simulated_sites(wanted))
        write_cohort(generate_cohort(config), home.cohort)
    return home.cohort


def _security(home: TwinHome, tls: bool, site_ids: list[str]) -> Path | None:
    """Production mode (mutual TLS): a PKI under TWIN_HOME/pki with a certificate for every
    site (created, or completed, as needed). Otherwise local/dev mode, said out loud."""
    if not tls:
        os.environ.pop("TWIN_TLS_DIR", None)
        os.environ["TWIN_INSECURE"] = "1"
        return None
    from twin_wire import pki

    if not (home.pki / "ca.pem").exists():
        pki.init(home.pki)
    for site in site_ids:
        if not (home.pki / "sites" / f"{site}.pem").exists():
            pki.add_site(home.pki, site)
    os.environ["TWIN_TLS_DIR"] = str(home.pki)
    os.environ.pop("TWIN_INSECURE", None)
    return home.pki


def _mode_line(tls_dir: Path | None) -> str:
    if tls_dir is None:
        return (
            "Mode: local/dev (insecure localhost gRPC channels, no client authentication; "
            "--tls for mutual TLS). No patient row leaves a site worker."
        )
    return (
        f"Mode: production (mutual TLS; federation CA and certificates in {tls_dir}). "
        "No patient row leaves a site worker."
    )


def _privacy_line(args: argparse.Namespace) -> str:
    parts = [
        "secure aggregation ON (the orchestrator sees only the sum of updates)"
        if args.secure_aggregation or args.tls
        else "secure aggregation off (--secure-aggregation)",
        f"patient-level DP-SGD ON (noise multiplier {args.dp_sgd:g}, clip 1.0"
        + (
            f", budget epsilon {args.privacy_budget:g} at delta 1e-5)"
            if args.privacy_budget
            else ")"
        )
        if args.dp_sgd
        else "differential privacy off (--dp-sgd NOISE)",
    ]
    return "Privacy: " + "; ".join(parts) + "."


def _spent_line(home: TwinHome, config) -> str:
    from twin_pipelines.resources import RoundStore

    ledger = RoundStore(root=str(home.rounds)).ledger()
    spent = ", ".join(
        f"{scope} {ledger.spent(scope, config.privacy_delta):.2f}" for scope in ledger.scopes
    )
    return f"Privacy spent (epsilon at delta {config.privacy_delta:g}, all campaigns): {spent}"


def _launches(
    home: TwinHome, seed: int, n_sites: int, tls_dir: Path | None = None, workers: int = 0
):
    """One worker process per site (as hospitals run them), or, with `workers` set (and by
    default beyond 10 sites), that many processes hosting the sites as virtual sites."""
    from twin_pipelines.local_fleet import SiteLaunch

    cohort = _ensure_cohort(home, seed, n_sites)
    ids = _site_ids(n_sites)
    schema, truth = cohort / "schema.yaml", cohort / "truth" / "summary.json"
    workers = workers or (len(ids) if len(ids) <= 10 else 4)
    if workers >= len(ids):
        return [
            SiteLaunch(
                s, data=cohort / "sites" / f"{s}.csv", schema=schema, truth=truth, tls_dir=tls_dir
            )
            for s in ids
        ]
    per = -(-len(ids) // workers)
    groups = [ids[i : i + per] for i in range(0, len(ids), per)]
    return [
        SiteLaunch(
            f"worker-{w + 1}",
            data=cohort / "sites" / "{site}.csv",
            schema=schema,
            truth=truth,
            tls_dir=tls_dir,
            sites=tuple(group),
        )
        for w, group in enumerate(groups)
    ]


def _started_line(endpoints: dict[str, str], workers: int, seconds: float) -> str:
    if workers == len(endpoints):
        return f"Started {workers} site workers ({seconds:.1f} s): " + ", ".join(
            f"{s}@{a}" for s, a in endpoints.items()
        )
    addresses = sorted(set(endpoints.values()))
    return (
        f"Started {len(endpoints)} virtual sites in {workers} site worker processes "
        f"({seconds:.1f} s): {', '.join(addresses)}"
    )


_COLUMNS = (
    "round",
    "sites",
    "failed",
    "pooled loss",
    "MAE h1",
    "x oracle",
    "cover90",
    "PROCOVA ATE",
    "seconds",
    "registered",
)
_ROW = "{:<7}{:>6}{:>7}{:>12}{:>8}{:>9}{:>8}{:>16}{:>8}  {}"


def _round_row(r, seconds: float) -> str:
    def num(key: str, digits: int = 4) -> str:
        return f"{r.pooled[key]:.{digits}f}" if key in r.pooled else "-"

    reg = r.registered
    if reg:
        role = "champion" if reg["promoted"] else "challenger"
        label = f"{reg['model_name']} v{reg['version']} ({role})"
    else:
        label = f"nothing: {r.error}"
    effect = (
        f"{r.pooled['procova_ate']:.2f} +- {r.pooled['procova_se']:.2f}"
        if "procova_ate" in r.pooled
        else "-"
    )
    return _ROW.format(
        r.round_key,
        len(r.sites),
        len(r.failed_sites),
        num("loss"),
        num("mae_h1", 3),
        num("mae_h1_vs_oracle", 3),
        num("coverage90_all", 3),
        effect,
        f"{seconds:.2f}",
        label,
    )


def _fitness_line(r, home: TwinHome) -> str:
    """The last round's twin, read for trial simulation (truth from the cohort's summary)."""
    import json

    from twin_core.twin_report import Effect

    p = r.pooled
    truth = json.loads((home.cohort / "truth" / "summary.json").read_text())["pooled"]
    low, high = Effect("procova", p["procova_ate"], p["procova_se"]).ci95
    vs_oracle = f" = {p['mae_h1_vs_oracle']:.3f} x the oracle" if "mae_h1_vs_oracle" in p else ""
    return (
        f"Twin fitness ({r.round_key}): one-visit-ahead MAE {p['mae_h1']:.3f}{vs_oracle}; "
        f"90 % intervals cover {p['coverage90_all']:.3f}; PROCOVA ATE {p['procova_ate']:.2f} "
        f"(95 % CI {low:.2f} to {high:.2f}; truth {truth['true_ate']:.2f}), variance ratio "
        f"{p['variance_ratio']:.2f}.\n  Figures: {home.rounds / r.round_key / 'twin'}/*.png"
    )


def demo(args: argparse.Namespace) -> int:
    home = TwinHome.from_env()
    if args.fresh and home.root.exists():
        shutil.rmtree(home.root)
    _prepare_env(home)
    import dagster as dg

    from twin_pipelines.campaign import RoundResult, run_campaign
    from twin_pipelines.config import RoundConfig
    from twin_pipelines.definitions import build_definitions, resources_from_env
    from twin_pipelines.local_fleet import LocalFleet
    from twin_pipelines.resources import GrpcFleet

    print(f"Twin Pipelines demo: embedded default under {home.root}")
    if args.production:
        args.tls, args.secure_aggregation = True, True
        args.dp_sgd = args.dp_sgd or 1.0
        args.privacy_budget = args.privacy_budget or 30.0
    if args.sites < 1:
        raise SystemExit("twin demo: --sites must be at least 1")
    site_ids = _site_ids(args.sites)
    tls_dir = _security(home, args.tls, site_ids)
    print(_mode_line(tls_dir))
    print(_privacy_line(args))
    started = time.perf_counter()
    with LocalFleet(home.sites_dir) as fleet:
        launches = _launches(home, args.seed, args.sites, tls_dir, args.workers)
        endpoints = fleet.start(launches, timeout=180 + 2 * len(site_ids))
        fleet.write_sites_file(home.sites_file)
        print(_started_line(endpoints, len(launches), time.perf_counter() - started))
        resources = resources_from_env()
        resources["fleet"] = GrpcFleet(
            endpoints=",".join(f"{s}={a}" for s, a in endpoints.items()),
            tls_dir=str(tls_dir or ""),
            insecure=tls_dir is None,
        )
        defs = build_definitions(**resources)
        config = RoundConfig(
            seed=args.seed,
            local_epochs=args.local_epochs,
            min_sites=args.min_sites,
            # unset: on in production mode (mutual TLS), off in local/dev mode
            secure_aggregation=True if args.secure_aggregation else None,
            dpsgd_noise_multiplier=args.dp_sgd,
            privacy_budget=args.privacy_budget,
            # DP noise costs accuracy; the demo registers what the privacy allows
            **(
                {"regression_tolerance": 0.5, "site_regression_tolerance": 1.0}
                if args.dp_sgd
                else {}
            ),
        )
        print("\n" + _ROW.format(*_COLUMNS) + "\n" + "-" * 112)
        clock = [time.perf_counter()]

        def report(r: RoundResult) -> None:
            now = time.perf_counter()
            print(_round_row(r, now - clock[0]), flush=True)
            clock[0] = now

        with dg.DagsterInstance.get() as instance:
            results = run_campaign(
                defs, instance, args.rounds, config, on_round=report, log_level=args.log_level
            )
    ok = all(r.success for r in results)
    losses = [r.pooled["loss"] for r in results if "loss" in r.pooled]
    if len(losses) >= 2:
        trend = "fell" if losses[-1] < losses[0] else "did not fall"
        print(f"\nPooled validation loss {trend}: {losses[0]:.4f} -> {losses[-1]:.4f}")
    if results and results[-1].success and "procova_ate" in results[-1].pooled:
        print(_fitness_line(results[-1], home))
    if args.dp_sgd:
        print(_spent_line(home, config))
    print(f"Done in {time.perf_counter() - started:.1f} s.\n")
    print("Where to look next:")
    print(
        f"  make ui        Dagster UI {DAGSTER_URL} (asset group fl_round: runs, metadata, checks)"
    )
    print(
        f"                 MLflow UI  {MLFLOW_URL} (Models -> patient-twin: versions, model cards)"
    )
    print(f"  {home.rounds}   plans, persisted updates and candidates per round")
    print(f"  {home.cohort}   the synthetic cohort (truth/ is read by evaluation, never training)")
    return 0 if ok else 1


def _spawn(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )


def _workspace_dir() -> Path:
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (candidate / "workspace.yaml").exists():
            return candidate
    raise SystemExit("workspace.yaml not found: run `twin ui` from the project folder")


def ui(args: argparse.Namespace) -> int:
    home = TwinHome.from_env()
    _prepare_env(home)
    from twin_pipelines.local_fleet import LocalFleet

    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    workspace = _workspace_dir()
    children: list[subprocess.Popen] = []
    tls_dir = _security(home, args.tls, _site_ids(args.sites))
    print(_mode_line(tls_dir))
    with LocalFleet(home.sites_dir) as fleet:
        endpoints = fleet.start(_launches(home, args.seed, args.sites, tls_dir))
        os.environ["TWIN_SITES_FILE"] = str(fleet.write_sites_file(home.sites_file))
        print("Site workers: " + ", ".join(f"{s}@{a}" for s, a in endpoints.items()))
        bin_dir = Path(sys.executable).parent
        children.append(
            _spawn(
                [
                    str(bin_dir / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    home.tracking_uri,
                    "--default-artifact-root",
                    home.artifact_root.resolve().as_uri(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(args.mlflow_port),
                ],
                home.root / "logs" / "mlflow.log",
            )
        )
        children.append(
            _spawn(
                [
                    str(bin_dir / "dagster"),
                    "dev",
                    "-w",
                    str(workspace / "workspace.yaml"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(args.dagster_port),
                ],
                home.root / "logs" / "dagster.log",
                cwd=workspace,
            )
        )
        print(
            f"Dagster UI: http://127.0.0.1:{args.dagster_port}  (Jobs -> fl_campaign_job -> "
            "Launchpad starts a campaign; Assets -> fl_round shows rounds)"
        )
        print(f"MLflow UI:  http://127.0.0.1:{args.mlflow_port}  (Models -> patient-twin)")
        print(f"Logs in {home.root / 'logs'}; Ctrl-C stops everything.")
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"] and all(c.poll() is None for c in children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            for child in children:
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
    return 0


def cohort(args: argparse.Namespace) -> int:
    from twin_core.cohort import CohortConfig, DriftSpec, generate_cohort, write_cohort

    config = CohortConfig(seed=args.seed, drift=tuple(DriftSpec.parse(d) for d in args.drift or ()))
    paths = write_cohort(generate_cohort(config), Path(args.out))
    for name, path in paths.items():
        print(f"{name:<8} {path}")
    return 0


def experiment(args: argparse.Namespace) -> int:
    home = TwinHome.from_env()
    _prepare_env(home)
    if args.kind == "twin":
        from twin_pipelines.twin_experiment import write_report as write_twin_report

        path = write_twin_report(
            args.seeds,
            args.rounds or 30,
            args.local_epochs,
            Path(args.out),
            local_steps=args.local_steps,
            epochs=args.epochs,
        )
    elif args.kind == "privacy":
        from twin_pipelines.privacy_experiment import write_report as write_privacy_report

        print(f"The cost of privacy: {args.rounds or 8} rounds per arm, seed {args.seed}")
        path = write_privacy_report(
            args.rounds or 8, args.seed, Path(args.out), echo=lambda line: print(line, flush=True)
        )
        print(f"\nwritten: {path} and {path.with_suffix('.png')}")
        return 0
    else:
        from twin_pipelines.experiments import write_report

        path = write_report(args.kind, args.rounds or 8, args.seed, Path(args.out))
    print(path.read_text())
    print(f"written: {path} and {path.with_suffix('.png')}")
    return 0


def pki_command(args: argparse.Namespace) -> int:
    from twin_wire import pki

    try:
        if args.action == "init":
            written = pki.init(Path(args.folder), list(args.sites))
        else:
            if not args.sites:
                print("twin pki add-site: name at least one site id", file=sys.stderr)
                return 2
            written = {s: pki.add_site(Path(args.folder), s) for s in args.sites}
    except pki.PkiError as exc:
        print(f"twin pki: {exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name:<14} {path}")
    if args.action == "init":
        print(f"Keep {Path(args.folder) / 'ca.key'} offline; give each site only its own key.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a federated campaign on the synthetic cohort")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--sites",
        type=int,
        default=5,
        help="sites taking part: up to 5 from the reference cohort; more are simulated "
        "(the reference profiles in turn), e.g. --sites 100",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="site worker processes hosting the sites as virtual sites (default: one per site "
        "up to 10 sites, else 4)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--min-sites", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="delete TWIN_HOME first")
    p.add_argument(
        "--tls", action="store_true", help="production mode: mutual TLS (PKI in TWIN_HOME/pki)"
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="the orchestrator sees only the sum of the sites' updates",
    )
    p.add_argument(
        "--dp-sgd",
        type=float,
        default=0.0,
        metavar="NOISE",
        help="patient-level DP-SGD at every site with this noise multiplier (clip 1.0)",
    )
    p.add_argument(
        "--privacy-budget",
        type=float,
        default=0.0,
        metavar="EPSILON",
        help="refuse a round that would take any site past this epsilon (delta 1e-5)",
    )
    p.add_argument(
        "--production",
        action="store_true",
        help="all of it: --tls --secure-aggregation --dp-sgd 1.0 --privacy-budget 30",
    )
    p.add_argument("--log-level", default="WARNING", help="Dagster console log level")
    p.set_defaults(run=demo)
    p = sub.add_parser("ui", help="start site workers, the MLflow UI and the Dagster UI")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dagster-port", type=int, default=3000)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--tls", action="store_true", help="production mode: mutual TLS")
    p.set_defaults(run=ui)
    p = sub.add_parser("pki", help="the federation's certificates (mutual TLS)")
    p.add_argument("action", choices=["init", "add-site"])
    p.add_argument("folder", help="where the CA and certificates live")
    p.add_argument("sites", nargs="*", help="site ids (init: optional; add-site: one or more)")
    p.set_defaults(run=pki_command)
    p = sub.add_parser("cohort", help="write the synthetic multi-site cohort")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--drift", action="append", help="e.g. site-3:covariate_severity:200")
    p.set_defaults(run=cohort)
    p = sub.add_parser(
        "experiment",
        help="write a markdown + PNG report: strategies under heterogeneity or a poisoned "
        "site, the twin trained central / federated / local against the oracle, or the cost "
        "of secure aggregation and differential privacy",
    )
    p.add_argument("kind", choices=["heterogeneity", "poisoned", "twin", "privacy"])
    p.add_argument("--rounds", type=int, help="rounds per campaign (default 8; twin: 30)")
    p.add_argument("--seed", type=int, default=7, help="heterogeneity, poisoned, privacy: the seed")
    p.add_argument("--seeds", type=int, default=20, help="twin: seeds 0..N-1")
    p.add_argument(
        "--local-epochs", type=int, default=2, help="twin: epochs per round (--local-steps 0)"
    )
    p.add_argument(
        "--local-steps", type=int, default=20, help="twin: Adam steps per round at every site"
    )
    p.add_argument(
        "--epochs", type=int, default=30, help="twin: epochs of the central and local-only arms"
    )
    p.add_argument("--out", default="docs/experiments")
    p.set_defaults(run=experiment)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
