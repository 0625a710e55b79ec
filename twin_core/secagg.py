"""Secure aggregation: the orchestrator learns the sum of the sites' updates, not any one of them.

Pairwise-masked aggregation after Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017 (the semi-honest protocol, with the signed key
advertisement of its active variant when sites hold federation certificates):

1. advertise  each site makes two fresh X25519 key pairs for the round (one to encrypt shares
              to its peers, one for masks), a random self-mask seed b, and publishes the public
              keys and a SHA-256 commitment to b, signed with its certificate's key.
2. share      given the roster of advertised keys, it Shamir-splits b and its mask private key
              (t of n), and seals one share pair to each peer (ChaCha20-Poly1305 under a key
              agreed with that peer); the orchestrator relays the sealed shares, unreadable.
3. mask       it encodes its weighted update in fixed point (integers mod 2^64) and adds the
              keystream of b and, for every peer that shared, + or - the keystream of the
              seed agreed with that peer (lower id adds, higher subtracts: pairs cancel).
4. unmask     given who sent a masked update, each survivor reveals its shares of the
              survivors' b and of the dropped sites' mask keys, never both for one site. With
              t shares the orchestrator rebuilds them (checked against the commitments), strips
              the self masks and the dropped sites' pair masks, and is left with the sum.

A site that drops out after sharing costs nothing but its contribution; fewer than t sites at
any step fails the round with the counts. Everything here is plain values and functions; the
site's session (SiteSession) and the orchestrator's side (unmask_sum) are used by the site
worker and the round's assets.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from twin_core.errors import TwinError
from twin_core.weights import Weights

FRACTION_BITS = 24  # fixed point: a value v travels as round(v * 2^24) mod 2^64
SCALE = float(1 << FRACTION_BITS)
# |v| * 2^24 summed over the sites must stay below 2^63 (the ring's signed half)
MAX_SITES = 1 << 10
MAX_ABS = float(1 << (63 - FRACTION_BITS)) / MAX_SITES
MASKED = "secagg.masked"  # the one tensor a site sends back under secure aggregation
SELF_MASK = "self_mask"
MASK_KEY = "mask_key"
_SHARE_INFO = b"twin-pipelines secagg v1 share key"
_MASK_INFO = b"twin-pipelines secagg v1 pair mask"


class SecAggError(TwinError):
    """Secure aggregation cannot go on: too few sites, a bad share, a protocol violation."""


# -- fixed point over the model's floating-point tensors -----------------------------------------
def layout(weights: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """The order and shapes in which a model's floating-point tensors are flattened."""
    return [(k, tuple(v.shape)) for k, v in sorted(weights.items()) if v.dtype.kind == "f"]


def encode(values: Mapping[str, np.ndarray], weight: float = 1.0) -> np.ndarray:
    """weight * values, flattened in `layout` order, as fixed-point integers mod 2^64."""
    flat = np.concatenate(
        [np.asarray(values[k], np.float64).ravel() for k, _ in layout(values)] or [np.zeros(0)]
    )
    scaled = flat * weight
    if not np.all(np.isfinite(scaled)):
        raise SecAggError("the update holds NaN or infinity: it cannot be encoded")
    worst = float(np.max(np.abs(scaled), initial=0.0))
    if worst >= MAX_ABS:
        raise SecAggError(
            f"the weighted update reaches {worst:.3g}, beyond the fixed-point range "
            f"(|value| < {MAX_ABS:.3g})"
        )
    return np.round(scaled * SCALE).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, like: Mapping[str, np.ndarray]) -> Weights:
    """The float64 tensors of a fixed-point sum, shaped like `like`'s floating-point tensors."""
    flat = total.view(np.int64).astype(np.float64) / SCALE
    out, at = {}, 0
    for name, shape in layout(like):
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[at : at + size].reshape(shape)
        at += size
    if at != flat.size:
        raise SecAggError(f"the sum has {flat.size} values, the model {at}")
    return out


def keystream(seed: bytes, n: int) -> np.ndarray:
    """n pseudo-random integers mod 2^64: the ChaCha20 keystream under `seed` (32 bytes, each
    used for one round and one purpose only, so the fixed nonce is safe)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * n)), dtype="<u8").astype(np.uint64)


def _derive(shared: bytes, round_key: str, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=round_key.encode(), info=info).derive(
        shared
    )


def pair_seed(private_raw: bytes, peer_public_raw: bytes, round_key: str) -> bytes:
    """The mask seed two sites agree on (X25519, then HKDF-SHA256 bound to the round)."""
    return _derive(pair_secret(private_raw, peer_public_raw), round_key, _MASK_INFO)


def pair_mask(own: str, peer: str, seed: bytes, n: int) -> np.ndarray:
    """What `own` adds for its pair with `peer`: + keystream if own < peer, - otherwise."""
    stream = keystream(seed, n)
    return stream if own < peer else (np.uint64(0) - stream)


# -- Shamir shares of 32-byte secrets (two GF(2^128) halves, pycryptodome) ------------------------
def split_secret(secret: bytes, threshold: int, holders: int) -> list[tuple[int, bytes]]:
    """`holders` shares (index 1..holders, 32 bytes each) of a 32-byte secret, any
    `threshold` of which rebuild it."""
    from Crypto.Protocol.SecretSharing import Shamir

    low = Shamir.split(threshold, holders, secret[:16], ssss=False)
    high = Shamir.split(threshold, holders, secret[16:], ssss=False)
    return [(i, a + b) for (i, a), (j, b) in zip(low, high, strict=True) if i == j]


def combine_secret(shares: Sequence[tuple[int, bytes]]) -> bytes:
    from Crypto.Protocol.SecretSharing import Shamir

    low = Shamir.combine([(i, s[:16]) for i, s in shares], ssss=False)
    high = Shamir.combine([(i, s[16:]) for i, s in shares], ssss=False)
    return low + high


def commitment(secret: bytes) -> bytes:
    return hashlib.sha256(b"twin-pipelines secagg v1 commitment" + secret).digest()


# -- the messages --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvertisedKeys:
    """A site's public keys for one round, and its commitment to its self-mask seed."""

    site_id: str
    cipher_public_key: bytes
    mask_public_key: bytes
    self_mask_commitment: bytes
    signature: bytes = b""  # over signed_payload, by the site's certificate key (mTLS mode)
    certificate_pem: bytes = b""

    def signed_payload(self, round_key: str) -> bytes:
        return b"|".join(
            [
                b"twin-pipelines secagg v1 keys",
                round_key.encode(),
                self.site_id.encode(),
                self.cipher_public_key,
                self.mask_public_key,
                self.self_mask_commitment,
            ]
        )


@dataclass(frozen=True)
class SealedShare:
    """One site's shares (of its self-mask seed and mask key) for one peer, encrypted to it."""

    from_site: str
    to_site: str
    ciphertext: bytes


@dataclass(frozen=True)
class RevealedShare:
    """A survivor's share of another site's secret, revealed at unmasking."""

    holder: str
    owner: str
    kind: str  # SELF_MASK (a survivor's seed) or MASK_KEY (a dropped site's mask key)
    index: int
    value: bytes


@dataclass(frozen=True)
class MaskingPlan:
    """What a site needs to mask its update: who shared (the sites whose pair masks it adds),
    the shares sealed to it, and how to weigh its update."""

    shared: tuple[str, ...]
    incoming: tuple[SealedShare, ...]
    weighting: str = "examples"  # examples (x completion) or uniform


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


def _associated(round_key: str, from_site: str, to_site: str) -> bytes:
    return f"twin-pipelines secagg v1 share|{round_key}|{from_site}|{to_site}".encode()


# -- a site's side of one round -----------------------------------------------------------------
@dataclass
class SiteSession:
    """A site's secrets and progress in one round's secure aggregation.

    `signer` (the site's certificate and key, PEM) signs the advertised keys; `ca_pem` makes the
    site check every peer's signature and certificate, so an orchestrator cannot slip in keys
    of its own (without them, dev mode, the orchestrator is trusted to relay keys faithfully).
    """

    site_id: str
    round_key: str
    signer: tuple[bytes, bytes] | None = None  # (certificate PEM, private key PEM)
    ca_pem: bytes | None = None
    _cipher_private: bytes = field(default=b"", repr=False)
    _mask_private: bytes = field(default=b"", repr=False)
    _self_seed: bytes = field(default=b"", repr=False)
    _roster: dict[str, AdvertisedKeys] = field(default_factory=dict, repr=False)
    _threshold: int = 0
    _held: dict[str, tuple[int, bytes, bytes]] = field(default_factory=dict, repr=False)
    _shared: tuple[str, ...] = ()
    _stage: str = "new"
    _advertised: AdvertisedKeys | None = field(default=None, repr=False)

    def advertise(self) -> AdvertisedKeys:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        if self._stage != "new":
            raise SecAggError(f"{self.site_id}: round {self.round_key} already advertised")
        raw = serialization.Encoding.Raw
        keys = []
        for _ in range(2):
            private = X25519PrivateKey.generate()
            keys.append(
                (
                    private.private_bytes(
                        raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
                    ),
                    private.public_key().public_bytes(raw, serialization.PublicFormat.Raw),
                )
            )
        (self._cipher_private, cipher_public), (self._mask_private, mask_public) = keys
        self._self_seed = secrets.token_bytes(32)
        keys_out = AdvertisedKeys(
            self.site_id, cipher_public, mask_public, commitment(self._self_seed)
        )
        if self.signer is not None:
            keys_out = sign_keys(keys_out, self.round_key, *self.signer)
        self._advertised = keys_out
        self._stage = "advertised"
        return keys_out

    def share(self, roster: Sequence[AdvertisedKeys], threshold: int) -> list[SealedShare]:
        """Check the roster, split this site's secrets among it, seal a share pair to each."""
        if self._stage != "advertised":
            raise SecAggError(f"{self.site_id}: sharing out of order (stage {self._stage})")
        by_site = {k.site_id: k for k in roster}
        if len(by_site) != len(roster):
            raise SecAggError("the roster names a site twice")
        if by_site.get(self.site_id) != self._advertised:
            raise SecAggError(f"the roster does not carry {self.site_id}'s own keys")
        check_threshold(threshold, len(by_site))
        if self.ca_pem is not None:
            for keys in roster:
                verify_keys(keys, self.round_key, self.ca_pem)
        self._roster, self._threshold = by_site, threshold
        order = sorted(by_site)
        seeds = split_secret(self._self_seed, threshold, len(order))
        masks = split_secret(self._mask_private, threshold, len(order))
        sealed = []
        for peer, (index, seed_share), (_, mask_share) in zip(order, seeds, masks, strict=True):
            key = _derive(
                pair_secret(self._cipher_private, by_site[peer].cipher_public_key),
                self.round_key,
                _SHARE_INFO,
            )
            plain = index.to_bytes(2, "big") + seed_share + mask_share
            nonce = b"\x00" * 12  # one key per ordered pair and round: used once
            associated = _associated(self.round_key, self.site_id, peer)
            sealed.append(
                SealedShare(self.site_id, peer, _aead(key).encrypt(nonce, plain, associated))
            )
        self._stage = "shared"
        return sealed

    def mask(self, plan: MaskingPlan, encoded: np.ndarray) -> np.ndarray:
        """The masked update: encoded + PRG(b) + sum of the pair masks with every site that
        shared. Opens the shares sealed to this site (and keeps them for unmasking)."""
        if self._stage != "shared":
            raise SecAggError(f"{self.site_id}: masking out of order (stage {self._stage})")
        shared = tuple(sorted(set(plan.shared)))
        if self.site_id not in shared or not set(shared) <= set(self._roster):
            raise SecAggError(f"{self.site_id}: the sites that shared are not of this roster")
        check_threshold(self._threshold, len(self._roster), present=len(shared))
        senders = {s.from_site for s in plan.incoming if s.to_site == self.site_id}
        if senders != set(shared):
            missing = sorted(set(shared) - senders)
            raise SecAggError(f"{self.site_id}: no shares from {missing} among those that shared")
        for sealed in plan.incoming:
            self._held[sealed.from_site] = self._open(sealed)
        n = encoded.size
        masked = encoded + keystream(self._self_seed, n)
        for peer in shared:
            if peer == self.site_id:
                continue
            seed = pair_seed(self._mask_private, self._roster[peer].mask_public_key, self.round_key)
            masked = masked + pair_mask(self.site_id, peer, seed, n)
        self._shared = shared
        self._stage = "masked"
        return masked

    def _open(self, sealed: SealedShare) -> tuple[int, bytes, bytes]:
        from cryptography.exceptions import InvalidTag

        sender = self._roster.get(sealed.from_site)
        if sender is None:
            raise SecAggError(f"a share from {sealed.from_site}, not in the roster")
        key = _derive(
            pair_secret(self._cipher_private, sender.cipher_public_key),
            self.round_key,
            _SHARE_INFO,
        )
        try:
            plain = _aead(key).decrypt(
                b"\x00" * 12,
                sealed.ciphertext,
                _associated(self.round_key, sealed.from_site, self.site_id),
            )
        except InvalidTag:
            raise SecAggError(
                f"{self.site_id}: the share from {sealed.from_site} fails authentication"
            ) from None
        return int.from_bytes(plain[:2], "big"), plain[2:34], plain[34:66]

    def unmask(self, survivors: Sequence[str]) -> list[RevealedShare]:
        """Shares of the survivors' self-mask seeds and of the dropped sites' mask keys.

        Once per round: answering twice (say, with a site moved from survivor to dropped)
        would hand over both secrets of one site and with them its update."""
        if self._stage != "masked":
            raise SecAggError(f"{self.site_id}: unmasking out of order (stage {self._stage})")
        alive = set(survivors)
        if self.site_id not in alive or not alive <= set(self._shared):
            raise SecAggError(f"{self.site_id}: the survivors are not among the sites that shared")
        check_threshold(self._threshold, len(self._roster), present=len(alive))
        self._stage = "unmasked"
        out = []
        for owner in self._shared:
            index, seed_share, mask_share = self._held[owner]
            if owner in alive:
                out.append(RevealedShare(self.site_id, owner, SELF_MASK, index, seed_share))
            else:
                out.append(RevealedShare(self.site_id, owner, MASK_KEY, index, mask_share))
        return out


def pair_secret(private_raw: bytes, peer_public_raw: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    return X25519PrivateKey.from_private_bytes(private_raw).exchange(
        X25519PublicKey.from_public_bytes(peer_public_raw)
    )


def check_threshold(threshold: int, roster: int, present: int | None = None) -> None:
    """t must be a majority of the roster (so no two disjoint groups can each unmask) and at
    least 2; `present` sites must reach it."""
    if not (threshold >= 2 and 2 * threshold > roster and threshold <= roster):
        raise SecAggError(
            f"threshold {threshold} for {roster} sites: it must be at least 2 and more than "
            f"half of them"
        )
    if present is not None and present < threshold:
        raise SecAggError(
            f"only {present} of {roster} sites remain, below the threshold of {threshold}: "
            "the round cannot be unmasked"
        )


def default_threshold(sites: int) -> int:
    """The smallest majority (at least 2)."""
    return max(2, sites // 2 + 1)


# -- signatures (mTLS mode) ----------------------------------------------------------------------
def sign_keys(
    keys: AdvertisedKeys, round_key: str, certificate_pem: bytes, key_pem: bytes
) -> AdvertisedKeys:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise SecAggError("a site's certificate key must be an elliptic-curve key")
    signature = private.sign(keys.signed_payload(round_key), ec.ECDSA(hashes.SHA256()))
    return AdvertisedKeys(
        keys.site_id,
        keys.cipher_public_key,
        keys.mask_public_key,
        keys.self_mask_commitment,
        signature,
        certificate_pem,
    )


def verify_keys(keys: AdvertisedKeys, round_key: str, ca_pem: bytes) -> None:
    """The keys are signed by a certificate of the federation's CA that names the site."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if not keys.signature or not keys.certificate_pem:
        raise SecAggError(f"the keys of {keys.site_id} are unsigned")
    try:
        cert = x509.load_pem_x509_certificate(keys.certificate_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SecAggError(f"the certificate of {keys.site_id} is not valid now")
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        named = names.get_values_for_type(x509.DNSName)
        if keys.site_id not in named:
            raise SecAggError(f"the keys of {keys.site_id} are signed by a certificate of {named}")
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(keys.signature, keys.signed_payload(round_key), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError, AssertionError, x509.ExtensionNotFound) as exc:
        raise SecAggError(
            f"the keys of {keys.site_id} fail verification against the federation CA: "
            f"{type(exc).__name__} {exc}"
        ) from None


# -- the orchestrator's side ----------------------------------------------------------------------
def unmask_sum(
    round_key: str,
    roster: Sequence[AdvertisedKeys],
    threshold: int,
    masked: Mapping[str, np.ndarray],
    revealed: Sequence[RevealedShare],
    shared: Sequence[str],
) -> np.ndarray:
    """The sum (mod 2^64) of the survivors' encoded updates from their masked ones.

    `shared`: the sites that sealed shares (and so entered every survivor's pair masks);
    `masked`: the survivors' masked updates; `revealed`: what the survivors answered at
    unmasking. Raises SecAggError below the threshold or when a rebuilt secret does not match
    its site's advertised commitment or key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    keys = {k.site_id: k for k in roster}
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(survivors))
    check_threshold(threshold, len(keys), present=len(survivors))
    holders = {r.holder for r in revealed}
    check_threshold(threshold, len(keys), present=len(holders & set(survivors)))
    n = next(iter(masked.values())).size
    if any(v.size != n or v.dtype != np.uint64 for v in masked.values()):
        raise SecAggError("the masked updates differ in length or type")
    by_owner: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
    for r in revealed:
        expected = SELF_MASK if r.owner in masked else MASK_KEY
        if r.holder not in masked or r.kind != expected:
            raise SecAggError(f"{r.holder} revealed a {r.kind} share of {r.owner}: not asked for")
        by_owner.setdefault((r.owner, r.kind), []).append((r.index, r.value))

    def rebuild(owner: str, kind: str) -> bytes:
        shares = sorted(set(by_owner.get((owner, kind), [])))
        if len(shares) < threshold:
            raise SecAggError(
                f"only {len(shares)} shares of {owner}'s {kind}, threshold {threshold}"
            )
        return combine_secret(shares[:threshold])

    total = np.zeros(n, np.uint64)
    for site in survivors:
        total = total + masked[site]
        seed = rebuild(site, SELF_MASK)
        if commitment(seed) != keys[site].self_mask_commitment:
            raise SecAggError(f"{site}'s rebuilt self-mask seed does not match its commitment")
        total = total - keystream(seed, n)
    for gone in dropped:
        private = rebuild(gone, MASK_KEY)
        public = (
            X25519PrivateKey.from_private_bytes(private)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        if public != keys[gone].mask_public_key:
            raise SecAggError(f"{gone}'s rebuilt mask key does not match its advertised key")
        for site in survivors:
            seed = pair_seed(private, keys[site].mask_public_key, round_key)
            total = total - pair_mask(site, gone, seed, n)
    return total
