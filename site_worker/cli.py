"""`python -m site_worker`: run one hospital's site worker.

    python -m site_worker --site-id site-1 --data site-1.csv --schema schema.yaml \
        --port 50051 --state-dir /var/lib/twin/site-1
    python -m site_worker --site-id site-1 --synthetic --cohort-seed 7 --port 50051 --state-dir ...
    python -m site_worker --config site.yaml      # the same keys, in YAML

Many virtual sites in one worker (simulations: each site its own data, state folder under
--state-dir, identity and SiteHandler; one gRPC server answers for all of them):

    python -m site_worker --synthetic --cohort-sites 100 --site-id site-001,site-002,... \
        --port 50051 --state-dir /tmp/twin-sim --insecure
    python -m site_worker --data 'sites/{site}.csv' --schema schema.yaml \
        --site-id a --site-id b --state-dir ... --insecure

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
    cohort_sites: int = 0  # synthetic: sites in the cohort (0: the default five)
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

    @property
    def site_ids(self) -> tuple[str, ...]:
        """The sites this worker serves: `site_id` is one id or a comma-separated list."""
        return tuple(s.strip() for s in self.site_id.split(",") if s.strip())

    def state_of(self, site_id: str) -> Path:
        """A site's own state folder: --state-dir itself, or a folder per virtual site."""
        return self.state_dir if len(self.site_ids) == 1 else self.state_dir / site_id

    def data_of(self, site_id: str) -> Path | None:
        return Path(str(self.data).replace("{site}", site_id)) if self.data else None

    def check(self) -> None:
        ids = self.site_ids
        if not ids:
            raise ValueError("--site-id is required")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--site-id lists a site twice: {list(ids)}")
        if len(ids) > 1 and self.data and "{site}" not in str(self.data):
            raise ValueError(
                "several sites need a data file each: put {site} in --data, "
                "e.g. --data 'sites/{site}.csv'"
            )
        if self.cohort_sites < 0:
            raise ValueError(f"--cohort-sites must be >= 0, got {self.cohort_sites}")
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
    p.add_argument(
        "--site-id",
        action="append",
        help="the site served; repeat it, or give a comma-separated list, for virtual sites",
    )
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
        "--cohort-sites",
        type=int,
        help="synthetic: sites in the simulated cohort, site-001.. (default: the five of the "
        "reference table)",
    )
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
    site_id = values.get("site_id")
    if isinstance(site_id, list | tuple):  # --site-id repeated, or a YAML list
        values["site_id"] = ",".join(str(s) for s in site_id)
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


def truth_summary(settings: SiteSettings) -> dict | None:
    """The generator's truth, if the worker's sites have one: a synthetic cohort knows its own;
    file sites are given the cohort's truth summary with --truth. Evaluation only."""
    import json

    if settings.truth is not None:
        return json.loads(Path(settings.truth).read_text())
    if settings.synthetic:
        from site_worker.data import synthetic_cohort

        return synthetic_cohort(settings.cohort_seed, settings.drift, settings.cohort_sites).summary
    return None


def site_oracle(settings: SiteSettings, site_id: str | None = None, summary: dict | None = None):
    """The generator's truth for one site (the first one served by default), or None."""
    from twin_core.oracle import Oracle

    summary = summary if summary is not None else truth_summary(settings)
    if summary is None:
        return None
    return Oracle.from_summary(summary, site_id or settings.site_ids[0])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s site_worker %(levelname)s %(message)s"
    )
    try:
        settings = settings_from_args(argv)
    except (ValueError, OSError) as exc:
        print(f"site_worker: configuration error: {exc}", file=sys.stderr)
        return 2
    identities: dict[str, object] = {}
    if settings.tls_dir is not None:
        from twin_wire.pki import PkiError, load

        try:
            identities = {s: load(settings.tls_dir, s) for s in settings.site_ids}
        except PkiError as exc:
            print(f"site_worker: configuration error: {exc}", file=sys.stderr)
            return 2
    # Before torch is imported: one thread per worker, or 10 workers on 2 cores thrash.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(settings.torch_threads))
    import torch

    torch.set_num_threads(settings.torch_threads)
    torch.set_num_interop_threads(1)

    from site_worker.server import SiteServer, serve

    try:
        summary = truth_summary(settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"site_worker: cannot read the cohort's truth: {exc}", file=sys.stderr)
        return 2
    handlers = {}
    for site_id in settings.site_ids:
        handler = _start_site(settings, site_id, summary, identities.get(site_id))
        if handler is None:
            return 2
        if not handlers:  # one warm-up per process: the kernels are the same for every site
            handler.warm_up()
        handlers[site_id] = handler
    first = next(iter(identities.values()), None)
    try:
        server = SiteServer(
            handlers,
            settings.host,
            settings.port,
            tls=first,
            allowed_peers=frozenset(settings.allow_peer),
            site_tls=list(identities.values()),
        )
    except (OSError, RuntimeError) as exc:
        print(
            f"site_worker: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return 2
    mode = "mutual TLS" if identities else "INSECURE (local/dev mode)"
    log.info(
        "%s: %s, answering %s",
        _sites_label(settings.site_ids),
        mode,
        ", ".join(settings.allow_peer),
    )
    serve(server, grace=settings.grace_seconds, ready_file=settings.ready_file)
    return 0


def _sites_label(site_ids: tuple[str, ...]) -> str:
    if len(site_ids) <= 3:
        return "site " + ", ".join(site_ids)
    return f"{len(site_ids)} virtual sites ({site_ids[0]} .. {site_ids[-1]})"


def _start_site(settings: SiteSettings, site_id: str, summary: dict | None, identity):
    """One site's handler, its data loaded and checked; None (after saying why) if it cannot
    start: a worker serves all its sites or none."""
    from site_worker.data import FileSource, SyntheticSource
    from site_worker.handler import SiteHandler
    from twin_core.errors import SchemaError, SiteDataError

    if settings.synthetic:
        source = SyntheticSource(
            site_id, settings.cohort_seed, settings.drift, settings.cohort_sites
        )
    else:
        data = settings.data_of(site_id)
        assert data and settings.schema
        source = FileSource(data, settings.schema)
    try:
        oracle = site_oracle(settings, site_id, summary) if summary is not None else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"site_worker: cannot use the truth of site {site_id}: {exc}", file=sys.stderr)
        return None
    try:
        handler = SiteHandler.from_source(
            site_id,
            source,
            holdout_fraction=settings.holdout_fraction,
            split_seed=settings.split_seed,
            state_dir=settings.state_of(site_id),
            drift_window_days=settings.drift_window_days,
            drift_share=settings.drift_share,
            share_drift_report=settings.share_drift_report,
            oracle=oracle,
            identity=identity,
        )
    except (SchemaError, SiteDataError, ValueError) as exc:
        print(f"site_worker: refusing to start site {site_id}: {exc}", file=sys.stderr)
        return None
    quality = handler.check_data()
    verdict = "passed" if quality.success else "FAILED, training refused until fixed"
    log.info("site %s: data check %s: %s", site_id, verdict, quality.summary())
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
    return handler
