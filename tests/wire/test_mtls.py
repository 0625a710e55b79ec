"""Mutual TLS between the orchestrator and a site worker: who gets in, who does not.

Every handshake failure reaches a gRPC client as UNAVAILABLE (the reason is only in gRPC's
own log); an authenticated caller that is not the orchestrator gets PERMISSION_DENIED.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from site_worker.server import SiteServer
from twin_core.errors import SiteCallError
from twin_pipelines.resources import GrpcFleet
from twin_pipelines.resources.fleet import FleetConfigError
from twin_wire import pki
from twin_wire.client import GrpcSite, mutual_tls

UTC = dt.UTC


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    pki.init(folder, ["site-1", "site-2"])
    return folder


@pytest.fixture(scope="module")
def server(federation, make_handler):
    """site-1's worker, serving mutual TLS with its own certificate."""
    site = SiteServer(
        {"site-1": make_handler("site-1")},
        "127.0.0.1",
        0,
        tls=pki.load(federation, "site-1"),
    )
    site.start()
    yield site
    site.stop(0)


def _client(server, site_id: str = "site-1", **security) -> GrpcSite:
    return GrpcSite(site_id, f"127.0.0.1:{server.port}", **security)


def _credentials(ca: bytes, key: bytes | None = None, cert: bytes | None = None):
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _refused(client: GrpcSite) -> SiteCallError:
    with pytest.raises(SiteCallError) as caught:
        client.info(timeout=5)
    client.close()
    return caught.value


def test_the_orchestrator_gets_in(server, federation):
    client = _client(server, **mutual_tls(federation, "site-1"))
    assert client.info(timeout=10).site_id == "site-1"
    client.close()


def test_a_client_without_a_certificate_is_refused(server, federation):
    ca = (federation / "ca.pem").read_bytes()
    options = (("grpc.ssl_target_name_override", "site-1"),)
    assert _refused(_client(server, credentials=_credentials(ca), options=options)).code == (
        "UNAVAILABLE"
    )


def test_a_plaintext_client_is_refused(server):
    assert _refused(_client(server)).code == "UNAVAILABLE"


def test_a_certificate_from_another_ca_is_refused(server, federation, tmp_path):
    pki.init(tmp_path / "rogue")
    rogue = pki.load(tmp_path / "rogue", pki.ORCHESTRATOR)
    ca = (federation / "ca.pem").read_bytes()  # it even trusts the right CA for the server
    credentials = _credentials(ca, rogue.key_pem, rogue.cert_pem)
    options = (("grpc.ssl_target_name_override", "site-1"),)
    assert _refused(_client(server, credentials=credentials, options=options)).code == (
        "UNAVAILABLE"
    )


def test_an_expired_certificate_is_refused(server, federation):
    now = dt.datetime.now(UTC)
    key, cert = pki.issue(
        (federation / "ca.key").read_bytes(),
        (federation / "ca.pem").read_bytes(),
        pki.ORCHESTRATOR,
        server=False,
        not_before=now - dt.timedelta(days=40),
        not_after=now - dt.timedelta(days=10),
    )
    credentials = _credentials((federation / "ca.pem").read_bytes(), key, cert)
    options = (("grpc.ssl_target_name_override", "site-1"),)
    assert _refused(_client(server, credentials=credentials, options=options)).code == (
        "UNAVAILABLE"
    )


def test_another_sites_certificate_is_refused(server, federation):
    """site-2's own (server) certificate cannot act as a client at all ..."""
    other = pki.load(federation, "site-2")
    credentials = _credentials(other.ca_pem, other.key_pem, other.cert_pem)
    options = (("grpc.ssl_target_name_override", "site-1"),)
    assert _refused(_client(server, credentials=credentials, options=options)).code == (
        "UNAVAILABLE"
    )


def test_a_valid_client_certificate_that_is_not_the_orchestrator_is_denied(server, federation):
    """... and a client certificate the CA issued to anyone else is authenticated but not
    allowed: the site answers only the orchestrator."""
    key, cert = pki.issue(
        (federation / "ca.key").read_bytes(),
        (federation / "ca.pem").read_bytes(),
        "site-2",
        server=False,
    )
    credentials = _credentials((federation / "ca.pem").read_bytes(), key, cert)
    options = (("grpc.ssl_target_name_override", "site-1"),)
    error = _refused(_client(server, credentials=credentials, options=options))
    assert error.code == "PERMISSION_DENIED"
    assert "['site-2']" in error.message and "orchestrator" in error.message


def test_the_orchestrator_checks_the_site_is_the_one_it_dialled(server, federation):
    """site-1 answers at the address the orchestrator believes is site-2's: the certificate
    names site-1, not site-2, so the handshake fails."""
    client = _client(server, "site-2", **mutual_tls(federation, "site-2"))
    assert _refused(client).code == "UNAVAILABLE"


def test_the_fleet_refuses_to_run_without_saying_how_it_is_secured(federation):
    with pytest.raises(FleetConfigError, match="TWIN_TLS_DIR"):
        GrpcFleet(endpoints="site-1=127.0.0.1:1").sites()
    secure = GrpcFleet(endpoints="site-1=127.0.0.1:1", tls_dir=str(federation))
    assert secure.mode.startswith("production") and "site-1" in secure.sites()
    dev = GrpcFleet(endpoints="site-1=127.0.0.1:1", insecure=True)
    assert dev.mode.startswith("local/dev")
    with pytest.raises(FleetConfigError, match="missing TLS file"):
        GrpcFleet(endpoints="site-1=127.0.0.1:1", tls_dir="/nonexistent").sites()


def test_adding_a_site_later_reissues_nothing_else(tmp_path):
    folder = tmp_path / "pki"
    pki.init(folder, ["site-a"])
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    pki.add_site(folder, "site-b")
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before
    assert set(after) - set(before) == {folder / "sites/site-b.pem", folder / "sites/site-b.key"}
    assert pki.certificate_identity(after[folder / "sites/site-b.pem"]) == "site-b"
    assert oct((folder / "sites/site-b.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(pki.PkiError, match="already has a certificate"):
        pki.add_site(folder, "site-b")
    with pytest.raises(pki.PkiError, match="already holds a CA"):
        pki.init(folder)
    with pytest.raises(pki.PkiError, match="cannot name a certificate"):
        pki.add_site(folder, "Site B!")
    with pytest.raises(pki.PkiError, match="orchestrator's identity"):
        pki.add_site(folder, "orchestrator")


def test_a_worker_hosting_virtual_sites_answers_as_each_of_them(federation, make_handler):
    """One server, two sites, each with its own certificate: the orchestrator dials a site by
    its id (TLS SNI) and gets that site's certificate, so each virtual site keeps its identity;
    a name the worker holds no certificate for fails the handshake."""
    identities = [pki.load(federation, s) for s in ("site-1", "site-2")]
    server = SiteServer(
        {s: make_handler(s) for s in ("site-1", "site-2")},
        "127.0.0.1",
        0,
        tls=identities[0],
        site_tls=identities,
    )
    server.start()
    try:
        for site_id in ("site-1", "site-2"):
            client = _client(server, site_id, **mutual_tls(federation, site_id))
            assert client.info(timeout=10).site_id == site_id
            client.close()
        # dialled as site-2 but asking for site-3's data: no certificate for that name
        pki.add_site(federation, "site-3") if not (
            federation / "sites/site-3.pem"
        ).exists() else None
        stranger = _client(server, "site-3", **mutual_tls(federation, "site-3"))
        assert _refused(stranger).code == "UNAVAILABLE"
    finally:
        server.stop(0)
