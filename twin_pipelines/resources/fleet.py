"""The site fleet: which sites exist and how to reach them."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import dagster as dg

from twin_core.dispatch import ReceiveSlots
from twin_core.errors import TwinError
from twin_core.federation import Site


class Fleet(Protocol):
    def sites(self) -> dict[str, Site]: ...


class FleetConfigError(TwinError):
    """The sites file or endpoint list is malformed."""


def parse_endpoints(text: str) -> dict[str, str]:
    """ "site-1=127.0.0.1:50051,site-2=..." -> {"site-1": "127.0.0.1:50051", ...}"""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        site_id, sep, target = item.partition("=")
        if not sep or not site_id.strip() or ":" not in target:
            raise FleetConfigError(f"bad endpoint {item!r}: expected site-id=host:port")
        out[site_id.strip()] = target.strip()
    return out


def read_sites_file(path: Path) -> dict[str, str]:
    """A YAML file `sites: [{id: site-1, address: "host:port"}, ...]`."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise FleetConfigError(
            f"sites file not found: {path} (run `twin fleet start` or set TWIN_SITES)"
        ) from None
    entries = doc.get("sites") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise FleetConfigError(f"{path}: expected a top-level 'sites' list")
    out: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("id") or not entry.get("address"):
            raise FleetConfigError(f"{path}: each site needs 'id' and 'address', got {entry!r}")
        if entry["id"] in out:
            raise FleetConfigError(f"{path}: site {entry['id']!r} listed twice")
        out[str(entry["id"])] = str(entry["address"])
    return out


_clients: dict[tuple, object] = {}
_slots: dict[tuple, ReceiveSlots] = {}
_clients_lock = threading.Lock()


class GrpcFleet(dg.ConfigurableResource):
    """Site workers reached over gRPC, listed in a sites file or an endpoint string.

    Channels are pooled per process (and per pid, so a forked process opens its own) and
    reused across rounds.
    """

    sites_file: str = ""
    endpoints: str = ""
    tls_dir: str = ""  # the federation's PKI folder (twin pki): mutual TLS on every channel
    insecure: bool = False  # plaintext channels: local/dev mode only, never by default
    # at most this many sites' updates in the orchestrator's memory at once (arriving, being
    # checked, being persisted): peak memory grows with this, not with the number of sites
    receive_slots: int = 8

    def endpoint_map(self) -> dict[str, str]:
        if self.endpoints:
            return parse_endpoints(self.endpoints)
        if self.sites_file:
            return read_sites_file(Path(self.sites_file))
        raise FleetConfigError("no sites configured: set TWIN_SITES or TWIN_SITES_FILE")

    @property
    def mode(self) -> str:
        return "production (mutual TLS)" if self.tls_dir else "local/dev (insecure channels)"

    def _security(self, site_id: str) -> dict:
        """Channel credentials for `site_id`: the orchestrator's certificate, the federation CA,
        and the site id as the name its certificate must carry (not the dialled host)."""
        if self.tls_dir:
            from twin_wire.client import mutual_tls
            from twin_wire.pki import PkiError

            try:
                return mutual_tls(Path(self.tls_dir), site_id)
            except PkiError as exc:
                raise FleetConfigError(str(exc)) from None
        if self.insecure:
            return {}
        raise FleetConfigError(
            "no TLS credentials for the site channels: set TWIN_TLS_DIR to the federation's "
            "PKI folder (twin pki init), or TWIN_INSECURE=1 for local/dev mode only"
        )

    def _connect(self, site_id: str, target: str) -> Site:
        from twin_wire.client import GrpcSite

        return GrpcSite(site_id, target, receive_slots=self.slots(), **self._security(site_id))

    def slots(self) -> ReceiveSlots:
        """One set of receive slots per process and limit, shared by the fleet's clients."""
        key = (os.getpid(), self.receive_slots)
        if key not in _slots:
            _slots[key] = ReceiveSlots(self.receive_slots)
        return _slots[key]

    def sites(self) -> dict[str, Site]:
        out: dict[str, Site] = {}
        with _clients_lock:
            for site_id, target in sorted(self.endpoint_map().items()):
                key = (
                    type(self).__name__,
                    os.getpid(),
                    site_id,
                    target,
                    self.tls_dir,
                    self.receive_slots,
                )
                if key not in _clients:
                    _clients[key] = self._connect(site_id, target)
                out[site_id] = _clients[key]  # type: ignore[assignment]
        return out


class InProcessFleet:
    """Sites living in this process (SiteHandler objects): the fast path for tests and
    simulations. The same round code runs over it as over GrpcFleet."""

    def __init__(self, sites: Mapping[str, Site]) -> None:
        self._sites = dict(sorted(sites.items()))

    def sites(self) -> dict[str, Site]:
        return dict(self._sites)
