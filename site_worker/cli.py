"""`python -m site_worker`: run one hospital's site worker.

    python -m site_worker --site-id site-1 --data site-1.csv --schema schema.yaml \
        --port 50051 --state-dir /var/lib/twin/site-1
    python -m site_worker --site-id site-1 --synthetic --cohort-seed 7 --port 50051 --state-dir ...
    python -m site_worker --config site.yaml      # the same keys, in YAML

A malformed data file, schema or config stops the worker at start-up with a clear message and
exit code 2; nothing is served until the data passes its checks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

log = logging.getLogger("site_worker")


@dataclass(frozen=True)
class SiteSettings:
    site_id: str
    state_dir: Path
    port: int = 50051
    host: str = "127.0.0.1"
    data: Path | None = None
    schema: Path | None = None
    synthetic: bool = False
    cohort_seed: int = 7
    drift: tuple[str, ...] = ()
    holdout_fraction: float = 0.2
    split_seed: int = 0
    torch_threads: int = 1
    grace_seconds: float = 30.0
    ready_file: Path | None = None
    drift_window_days: float | None = None
    drift_share: float = 0.5
    share_drift_report: bool = False
    truth: Path | None = None
    tls_dir: Path | None = None
    insecure: bool = False
    allow_peer: tuple[str, ...] = ("orchestrator",)

    def check(self) -> None:
        if self.synthetic == bool(self.data):
            raise ValueError("give either --data FILE (with --schema) or --synthetic")
        if self.data and not self.schema:
            raise ValueError("--data needs --schema: the declared schema of the file")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"--holdout-fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.torch_threads < 1:
            raise ValueError("--torch-threads must be >= 1")
        if bool(self.tls_dir) == self.insecure:
            raise ValueError(
                "give --tls-dir DIR (production: mutual TLS with the federation's certificates) "
                "or --insecure (local/dev only: plaintext, anyone on the network can call)"
            )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="site_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument("--site-id")
    p.add_argument("--state-dir", type=Path, help="where the worker keeps its journal and state")
    p.add_argument("--port", type=int, help="0 picks a free port (see --ready-file)")
    p.add_argument("--host")
    p.add_argument("--data", type=Path, help="CSV or Parquet file of this site's data")
    p.add_argument("--schema", type=Path, help="YAML schema declaring task, columns and target")
    p.add_argument(
        "--synthetic",
        action="store_true",
        default=None,
        help="serve this site's share of the synthetic cohort",
    )
    p.add_argument("--cohort-seed", type=int)
    p.add_argument(
        "--drift", action="append", help="synthetic drift, e.g. site-3:covariate_severity:200"
    )
    p.add_argument("--holdout-fraction", type=float)
    p.add_argument("--split-seed", type=int)
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--grace-seconds", type=float)
    p.add_argument("--ready-file", type=Path, help="write the bound port here once serving")
    p.add_argument(
        "--drift-window-days",
        type=float,
        help="current window for drift: the last N days of data (default: all of it)",
    )
    p.add_argument("--drift-share", type=float, help="share of drifted columns that is drift")
    p.add_argument(
        "--share-drift-report",
        action="store_true",
        default=None,
        help="allow the full Evidently HTML report to leave the site",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        help="the federation PKI folder (twin pki): serve mutual TLS with sites/<site-id>.pem",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="local/dev mode: plaintext gRPC, no client authentication",
    )
    p.add_argument(
        "--allow-peer",
        action="append",
        help="certificate name allowed to call (default: orchestrator); repeatable",
    )
    p.add_argument(
        "--truth",
        type=Path,
        help="synthetic cohort only: its truth/summary.json; evaluation then reports the "
        "generator's Bayes forecast beside the twin's (never used for training)",
    )
    return p


def settings_from_args(argv: list[str] | None = None) -> SiteSettings:
    args = vars(_parser().parse_args(argv))
    values: dict = {}
    config = args.pop("config")
    if config:
        import yaml

        doc = yaml.safe_load(Path(config).read_text()) or {}
        known = {f.name for f in fields(SiteSettings)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"{config}: unknown key(s) {unknown}; known: {sorted(known)}")
        values.update(doc)
    values.update({k: v for k, v in args.items() if v is not None})
    for key in ("site_id", "state_dir"):
        if not values.get(key):
            raise ValueError(f"--{key.replace('_', '-')} is required")
    for key in ("state_dir", "data", "schema", "ready_file", "truth", "tls_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    values["drift"] = tuple(values.get("drift") or ())
    values["synthetic"] = bool(values.get("synthetic"))
    values["share_drift_report"] = bool(values.get("share_drift_report"))
    values["insecure"] = bool(values.get("insecure"))
    values["allow_peer"] = tuple(values.get("allow_peer") or ("orchestrator",))
    settings = SiteSettings(**values)
    settings.check()
    return settings


def site_oracle(settings: SiteSettings):
    """The generator's truth for this site, if it has one: a synthetic site knows its own; a
    file site is given the cohort's truth summary with --truth. Evaluation only."""
    import json

    from twin_core.oracle import Oracle

    if settings.truth is not None:
        summary = json.loads(Path(settings.truth).read_text())
    elif settings.synthetic:
        from twin_core.cohort import CohortConfig, DriftSpec, generate_cohort

        drift = tuple(DriftSpec.parse(d) for d in settings.drift)
        summary = generate_cohort(CohortConfig(seed=settings.cohort_seed, drift=drift)).summary
    else:
        return None
    return Oracle.from_summary(summary, settings.site_id)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s site_worker %(levelname)s %(message)s"
    )
    try:
        settings = settings_from_args(argv)
    except (ValueError, OSError) as exc:
        print(f"site_worker: configuration error: {exc}", file=sys.stderr)
        return 2
    tls = None
    if settings.tls_dir is not None:
        from twin_wire.pki import PkiError, load

        try:
            tls = load(settings.tls_dir, settings.site_id)
        except PkiError as exc:
            print(f"site_worker: configuration error: {exc}", file=sys.stderr)
            return 2
    # Before torch is imported: one thread per worker, or 10 workers on 2 cores thrash.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(settings.torch_threads))
    import torch

    torch.set_num_threads(settings.torch_threads)
    torch.set_num_interop_threads(1)

    from site_worker.data import FileSource, SyntheticSource
    from site_worker.handler import SiteHandler
    from site_worker.server import SiteServer, serve
    from twin_core.errors import SchemaError, SiteDataError

    if settings.synthetic:
        source = SyntheticSource(settings.site_id, settings.cohort_seed, settings.drift)
    else:
        assert settings.data and settings.schema
        source = FileSource(settings.data, settings.schema)
    try:
        oracle = site_oracle(settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"site_worker: cannot use the truth of site {settings.site_id}: {exc}", file=sys.stderr
        )
        return 2
    try:
        handler = SiteHandler.from_source(
            settings.site_id,
            source,
            holdout_fraction=settings.holdout_fraction,
            split_seed=settings.split_seed,
            state_dir=settings.state_dir,
            drift_window_days=settings.drift_window_days,
            drift_share=settings.drift_share,
            share_drift_report=settings.share_drift_report,
            oracle=oracle,
            identity=tls,
        )
    except (SchemaError, SiteDataError, ValueError) as exc:
        print(f"site_worker: refusing to start site {settings.site_id}: {exc}", file=sys.stderr)
        return 2
    handler.warm_up()
    quality = handler.check_data()
    verdict = "passed" if quality.success else "FAILED, training refused until fixed"
    log.info("site %s: data check %s: %s", settings.site_id, verdict, quality.summary())
    info = handler.info()
    log.info(
        "site %s: task %s, schema %s, %d units, %d train / %d holdout examples",
        info.site_id,
        info.task,
        info.schema_fingerprint,
        info.units,
        info.train_examples,
        info.holdout_examples,
    )
    try:
        server = SiteServer(
            {settings.site_id: handler},
            settings.host,
            settings.port,
            tls=tls,
            allowed_peers=frozenset(settings.allow_peer),
        )
    except (OSError, RuntimeError) as exc:
        print(
            f"site_worker: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return 2
    mode = "mutual TLS" if tls else "INSECURE (local/dev mode)"
    log.info("site %s: %s, answering %s", settings.site_id, mode, ", ".join(settings.allow_peer))
    serve(server, grace=settings.grace_seconds, ready_file=settings.ready_file)
    return 0
