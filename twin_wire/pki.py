"""The federation's PKI: one CA, a certificate per site (a gRPC server) and one for the
orchestrator (the client), each naming its identity; files on disk, PEM.

    <dir>/ca.pem, ca.key                     the federation CA (keep ca.key offline)
    <dir>/orchestrator.pem, orchestrator.key the orchestrator's client certificate
    <dir>/sites/<site-id>.pem, .key          each site's server certificate

A site's certificate carries its id as DNS subject alternative name (and common name): the
orchestrator dials a site and accepts only the certificate that names the site id it dialled.
The orchestrator's certificate is for client authentication only; a site accepts only it.
Adding a site later signs one more certificate with the same CA; nothing else is re-issued.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

ORCHESTRATOR = "orchestrator"
_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
UTC = dt.UTC


class PkiError(ValueError):
    """A PKI operation that cannot be done as asked (the message says why)."""


def check_identity(identity: str) -> str:
    """Site ids go into certificates as DNS names: lower-case letters, digits and hyphens."""
    if not _ID.match(identity):
        raise PkiError(
            f"{identity!r} cannot name a certificate: use lower-case letters, digits and "
            "hyphens (at most 63, not starting or ending with a hyphen)"
        )
    return identity


@dataclass(frozen=True)
class Credentials:
    """What one party needs for mutual TLS: its key and certificate, and the CA to trust."""

    identity: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


def _key_usage(**kw):
    from cryptography import x509

    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(kw)
    return x509.KeyUsage(**flags)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(name: str = "Twin Pipelines federation CA", days: int = 3650) -> tuple[bytes, bytes]:
    """A new CA: (key PEM, certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def issue(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    identity: str,
    *,
    server: bool,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A certificate for `identity` signed by the CA: (key PEM, certificate PEM).

    server=True: a site (TLS server authentication); False: the orchestrator (client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check_identity(identity)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def certificate_identity(cert_pem: bytes) -> str:
    """The identity a certificate names (its first DNS subject alternative name)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName)[0]


# -- the folder ------------------------------------------------------------------------------
def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def init(folder: Path, site_ids: list[str] = ()) -> dict[str, Path]:
    """Create the CA, the orchestrator's certificate and one per site; refuse to overwrite."""
    folder = Path(folder)
    if (folder / "ca.pem").exists():
        raise PkiError(f"{folder} already holds a CA; add sites with `twin pki add-site`")
    ca_key, ca_cert = make_ca()
    _write(folder / "ca.key", ca_key, private=True)
    _write(folder / "ca.pem", ca_cert, private=False)
    key, cert = issue(ca_key, ca_cert, ORCHESTRATOR, server=False)
    _write(folder / f"{ORCHESTRATOR}.key", key, private=True)
    _write(folder / f"{ORCHESTRATOR}.pem", cert, private=False)
    written = {"ca": folder / "ca.pem", ORCHESTRATOR: folder / f"{ORCHESTRATOR}.pem"}
    for site in site_ids:
        written[site] = add_site(folder, site)
    return written


def add_site(folder: Path, site_id: str, days: int = 365) -> Path:
    """Sign one more site's certificate with the existing CA (no other certificate changes)."""
    folder = Path(folder)
    check_identity(site_id)
    if site_id == ORCHESTRATOR:
        raise PkiError(f"{ORCHESTRATOR!r} is the orchestrator's identity, not a site id")
    if not (folder / "ca.key").exists():
        raise PkiError(f"no CA in {folder}: run `twin pki init {folder}` first")
    cert_path = folder / "sites" / f"{site_id}.pem"
    if cert_path.exists():
        raise PkiError(f"{site_id} already has a certificate ({cert_path})")
    key, cert = issue(
        (folder / "ca.key").read_bytes(),
        (folder / "ca.pem").read_bytes(),
        site_id,
        server=True,
        days=days,
    )
    _write(folder / "sites" / f"{site_id}.key", key, private=True)
    _write(cert_path, cert, private=False)
    return cert_path


def load(folder: Path, identity: str) -> Credentials:
    """The credentials of `identity` (the orchestrator or a site) from a PKI folder."""
    folder = Path(folder)
    base = folder / identity if identity == ORCHESTRATOR else folder / "sites" / identity
    paths = [base.with_suffix(".key"), base.with_suffix(".pem"), folder / "ca.pem"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PkiError(f"missing TLS file(s) for {identity}: {', '.join(missing)}")
    key, cert, ca = (p.read_bytes() for p in paths)
    return Credentials(identity, key, cert, ca)
