"""Start and stop site workers as local processes: the embedded default's fleet.

Each worker is a real `python -m site_worker` process on a free localhost port, exactly as a
hospital would run it, with its own state folder and log. For simulations at scale one worker
may host many virtual sites (`SiteLaunch.hosting`), each with its own data, state folder and
identity: 100 sites on a 2-core machine are a few processes, not 100.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from twin_core.errors import SiteCallError, TwinError


class FleetStartError(TwinError):
    """A local site worker did not come up; the message carries the end of its log."""


@dataclass(frozen=True)
class SiteLaunch:
    """How to start one site worker: its data (a file and schema, or synthetic) and options.

    `site_id` names the worker (and is its site); `sites`, if given, are the virtual sites it
    hosts instead: then `data` holds `{site}` (one file per site) or the data is synthetic.
    """

    site_id: str
    data: Path | None = None
    schema: Path | None = None
    synthetic: bool = False
    cohort_seed: int = 7
    truth: Path | None = None  # the synthetic cohort's truth summary, for evaluation only
    tls_dir: Path | None = None  # the federation PKI folder; None: local/dev (insecure)
    extra_args: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()  # virtual sites hosted by this worker (default: site_id)
    cohort_sites: int = 0  # synthetic: sites in the simulated cohort (0: the default five)

    @property
    def hosting(self) -> tuple[str, ...]:
        return self.sites or (self.site_id,)

    def args(self) -> list[str]:
        out = ["--site-id", ",".join(self.hosting)]
        if self.synthetic:
            out += ["--synthetic", "--cohort-seed", str(self.cohort_seed)]
            if self.cohort_sites:
                out += ["--cohort-sites", str(self.cohort_sites)]
        else:
            out += ["--data", str(self.data), "--schema", str(self.schema)]
        if self.truth is not None:
            out += ["--truth", str(self.truth)]
        out += ["--tls-dir", str(self.tls_dir)] if self.tls_dir else ["--insecure"]
        return out + list(self.extra_args)


@dataclass
class LocalSite:
    """A site served by a local worker process (which may serve other sites too)."""

    site_id: str
    process: subprocess.Popen
    state_dir: Path
    log_path: Path
    port: int = 0
    tls_dir: Path | None = None
    ready_file: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class LocalFleet:
    """A set of running local site workers. Use as a context manager to stop them for sure."""

    root: Path
    sites: dict[str, LocalSite] = field(default_factory=dict)

    def start(self, launches: list[SiteLaunch], timeout: float = 180.0) -> dict[str, str]:
        """Start every worker, wait until each answers its health check; return addresses."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        started: list[LocalSite] = []
        for launch in launches:
            state = self.root / launch.site_id
            state.mkdir(parents=True, exist_ok=True)
            ready = state / "port"
            ready.unlink(missing_ok=True)
            log_path = state / "worker.log"
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "site_worker",
                        *launch.args(),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--state-dir",
                        str(state),
                        "--ready-file",
                        str(ready),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            hosted = launch.hosting
            for site_id in hosted:
                # a worker of several virtual sites keeps each one's state in a folder of its own
                site_state = state if len(hosted) == 1 else state / site_id
                self.sites[site_id] = LocalSite(
                    site_id, process, site_state, log_path, tls_dir=launch.tls_dir, ready_file=ready
                )
            started.append(self.sites[hosted[0]])
        deadline = time.monotonic() + timeout
        for first in started:
            self._await_ready(first, deadline)
            for site in self.sites.values():
                if site.process is first.process:
                    site.port = first.port
        return self.endpoints()

    def _await_ready(self, site: LocalSite, deadline: float) -> None:
        from twin_wire.client import GrpcSite

        ready = site.ready_file or site.state_dir / "port"
        while not ready.exists():
            if site.process.poll() is not None:
                raise FleetStartError(
                    f"site worker {site.site_id} exited with code {site.process.returncode}:\n"
                    f"{site.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise FleetStartError(
                    f"site worker {site.site_id} not ready in time:\n{site.log_tail()}"
                )
            time.sleep(0.05)
        site.port = int(ready.read_text())
        from twin_wire.client import mutual_tls

        security = mutual_tls(site.tls_dir, site.site_id) if site.tls_dir else {}
        client = GrpcSite(site.site_id, site.address, **security)
        try:
            client.wait_healthy(timeout=max(1.0, deadline - time.monotonic()))
        except SiteCallError as exc:
            raise FleetStartError(f"{exc}\n{site.log_tail()}") from None
        finally:
            client.close()

    def endpoints(self) -> dict[str, str]:
        return {s: site.address for s, site in sorted(self.sites.items()) if site.port}

    def write_sites_file(self, path: Path) -> Path:
        doc = {"sites": [{"id": s, "address": a} for s, a in self.endpoints().items()]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def workers(self) -> list[subprocess.Popen]:
        """The worker processes, each once (a worker may serve several sites)."""
        unique: dict[int, subprocess.Popen] = {}
        for site in self.sites.values():
            unique.setdefault(site.process.pid, site.process)
        return list(unique.values())

    def kill(self, site_id: str) -> None:
        """SIGKILL the worker of a site at once (a crash, for failure drills); every virtual
        site it hosts goes down with it."""
        site = self.sites[site_id]
        if site.process.poll() is None:
            os.killpg(site.process.pid, signal.SIGKILL)
            site.process.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every worker (they finish running calls), then SIGKILL stragglers."""
        for process in self.workers():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.workers():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
