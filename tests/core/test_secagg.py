"""Secure aggregation (twin_core/secagg.py): the sum is exact, dropouts are recovered, a single
masked update looks like noise, and the protocol refuses what would leak."""

from __future__ import annotations

import numpy as np
import pytest

from twin_core import secagg
from twin_core.secagg import MaskingPlan, SecAggError, SiteSession


def _updates(sites, seed=0):
    rng = np.random.default_rng(seed)
    return {
        s: {"a.weight": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5)}
        for s in sites
    }


def _run(updates, weights, threshold, drop_before_mask=(), drop_before_unmask=(), ca=None):
    """The whole protocol in one process; returns (decoded sum, the masked vectors)."""
    key = "2026-12-04T00"
    sites = sorted(updates)
    sessions = {s: SiteSession(s, key, **(ca or {}).get(s, {})) for s in sites}
    roster = [sessions[s].advertise() for s in sites]
    sealed = {s: sessions[s].share(roster, threshold) for s in sites}
    shared = [s for s in sites if s not in drop_before_mask]
    masked = {}
    for s in shared:
        incoming = tuple(x for f in shared for x in sealed[f] if x.to_site == s)
        plan = MaskingPlan(tuple(shared), incoming)
        masked[s] = sessions[s].mask(plan, secagg.encode(updates[s], weights[s]))
    answering = [s for s in masked if s not in drop_before_unmask]
    revealed = [r for s in answering for r in sessions[s].unmask(sorted(masked))]
    total = secagg.unmask_sum(key, roster, threshold, masked, revealed, shared)
    return secagg.decode(total, next(iter(updates.values()))), masked


def _weighted_sum(updates, weights, sites):
    return {
        k: sum(weights[s] * np.asarray(updates[s][k], np.float64) for s in sites)
        for k in updates[sites[0]]
    }


def test_the_sum_equals_the_plain_weighted_sum_within_fixed_point():
    sites = ["site-1", "site-2", "site-3", "site-4", "site-5"]
    updates = _updates(sites)
    weights = {s: float(10 * (i + 1)) for i, s in enumerate(sites)}
    total, _ = _run(updates, weights, threshold=3)
    expected = _weighted_sum(updates, weights, sites)
    for k in expected:
        # each site rounds to 2^-24: the sum is off by at most 5 half-steps
        np.testing.assert_allclose(total[k], expected[k], rtol=0, atol=5 * 0.5 / secagg.SCALE)


def test_a_site_dropped_after_sharing_is_recovered_and_left_out_of_the_sum():
    sites = ["a", "b", "c", "d", "e"]
    updates, weights = _updates(sites, 1), dict.fromkeys(sites, 1.0)
    total, masked = _run(updates, weights, threshold=3, drop_before_mask=("c",))
    assert sorted(masked) == ["a", "b", "d", "e"]
    expected = _weighted_sum(updates, weights, ["a", "b", "d", "e"])
    for k in expected:
        np.testing.assert_allclose(total[k], expected[k], atol=1e-6)


def test_a_site_dropped_after_masking_still_counts_through_the_others_shares():
    sites = ["a", "b", "c", "d", "e"]
    updates, weights = _updates(sites, 2), dict.fromkeys(sites, 2.0)
    total, _ = _run(updates, weights, threshold=3, drop_before_unmask=("b",))
    expected = _weighted_sum(updates, weights, sites)
    for k in expected:
        np.testing.assert_allclose(total[k], expected[k], atol=1e-6)


def test_below_the_threshold_the_round_fails_with_the_counts():
    sites = ["a", "b", "c", "d", "e"]
    updates = _updates(sites, 3)
    with pytest.raises(SecAggError, match="only 2 of 5 sites remain, below the threshold of 3"):
        _run(updates, dict.fromkeys(sites, 1.0), 3, drop_before_mask=("a", "b", "c"))
    with pytest.raises(SecAggError, match="below the threshold of 3"):
        _run(updates, dict.fromkeys(sites, 1.0), 3, drop_before_unmask=("a", "b", "c"))


def test_a_single_masked_update_is_indistinguishable_from_uniform_noise():
    """Kolmogorov-Smirnov against U(0, 1) of the masked integers / 2^64, and no correlation
    with the update: the encoded update itself fails the same test."""
    from scipy import stats

    rng = np.random.default_rng(4)
    sites = ["a", "b", "c"]
    updates = {s: {"w": rng.normal(size=20_000).astype(np.float32)} for s in sites}
    _, masked = _run(updates, dict.fromkeys(sites, 1.0), 2)
    one = masked["a"].astype(np.float64) / 2.0**64
    assert stats.kstest(one, "uniform").pvalue > 1e-3
    plain = secagg.encode(updates["a"]).astype(np.float64) / 2.0**64
    assert stats.kstest(plain, "uniform").pvalue < 1e-12
    assert abs(np.corrcoef(one, updates["a"]["w"])[0, 1]) < 0.03
    # every bit of the masked integers is a fair coin
    bits = np.unpackbits(masked["a"].view(np.uint8)).reshape(-1, 64).mean(0)
    assert np.all(np.abs(bits - 0.5) < 0.02)


def test_shamir_shares_rebuild_a_32_byte_secret_from_any_threshold():
    secret = bytes(range(32))
    shares = secagg.split_secret(secret, 3, 5)
    assert [i for i, _ in shares] == [1, 2, 3, 4, 5]
    assert secagg.combine_secret([shares[4], shares[0], shares[2]]) == secret
    assert secagg.combine_secret(shares[:2]) != secret  # too few: garbage, caught by commitments


def test_fixed_point_round_trip_and_range():
    values = {"w": np.array([0.5, -0.25, 1e-7, -3.0], np.float32), "i": np.array([3])}
    encoded = secagg.encode(values, 2.0)
    assert encoded.dtype == np.uint64 and encoded.size == 4  # integer buffers are not encoded
    back = secagg.decode(encoded, values)
    np.testing.assert_allclose(back["w"], [1.0, -0.5, 2e-7, -6.0], atol=0.5 / secagg.SCALE)
    with pytest.raises(SecAggError, match="beyond the fixed-point range"):
        secagg.encode({"w": np.array([1e12])})
    with pytest.raises(SecAggError, match="NaN or infinity"):
        secagg.encode({"w": np.array([np.nan])})


def test_pairs_cancel_and_seeds_agree():
    a, b = SiteSession("a", "r"), SiteSession("b", "r")
    ka, kb = a.advertise(), b.advertise()
    seed_ab = secagg.pair_seed(a._mask_private, kb.mask_public_key, "r")
    assert seed_ab == secagg.pair_seed(b._mask_private, ka.mask_public_key, "r")
    assert seed_ab != secagg.pair_seed(a._mask_private, kb.mask_public_key, "other round")
    total = secagg.pair_mask("a", "b", seed_ab, 8) + secagg.pair_mask("b", "a", seed_ab, 8)
    assert not total.any()


def test_a_site_never_reveals_both_secrets_of_one_site():
    sites = ["a", "b", "c"]
    sessions = {s: SiteSession(s, "r") for s in sites}
    roster = [sessions[s].advertise() for s in sites]
    sealed = {s: sessions[s].share(roster, 2) for s in sites}
    for s in sites:
        incoming = tuple(x for f in sites for x in sealed[f] if x.to_site == s)
        sessions[s].mask(MaskingPlan(tuple(sites), incoming), secagg.encode({"w": np.ones(3)}))
    revealed = sessions["a"].unmask(["a", "b", "c"])
    assert {r.kind for r in revealed} == {secagg.SELF_MASK}
    with pytest.raises(SecAggError, match="out of order"):
        sessions["a"].unmask(["a", "b"])  # now also asking for c's mask key


def test_the_site_refuses_a_minority_threshold_and_a_forged_roster():
    sessions = {s: SiteSession(s, "r") for s in "abcd"}
    roster = [sessions[s].advertise() for s in "abcd"]
    with pytest.raises(SecAggError, match="more than half"):
        sessions["a"].share(roster, 2)  # two disjoint pairs could each unmask
    forged = SiteSession("a", "r").advertise()
    with pytest.raises(SecAggError, match="own keys"):
        sessions["a"].share([forged, *roster[1:]], 3)


def test_a_tampered_share_fails_authentication():
    sessions = {s: SiteSession(s, "r") for s in "abc"}
    roster = [sessions[s].advertise() for s in "abc"]
    sealed = {s: sessions[s].share(roster, 2) for s in "abc"}
    incoming = [x for f in "abc" for x in sealed[f] if x.to_site == "a"]
    bad = incoming[1]
    flipped = bytes([bad.ciphertext[0] ^ 1]) + bad.ciphertext[1:]
    incoming[1] = secagg.SealedShare(bad.from_site, bad.to_site, flipped)
    with pytest.raises(SecAggError, match="fails authentication"):
        sessions["a"].mask(MaskingPlan(tuple("abc"), tuple(incoming)), np.zeros(2, np.uint64))


def test_signed_keys_verify_against_the_federation_ca_and_forgeries_do_not(tmp_path):
    from twin_wire import pki

    pki.init(tmp_path / "pki", ["a", "b", "c"])
    rogue = tmp_path / "rogue"
    pki.init(rogue, ["a"])
    creds = {s: pki.load(tmp_path / "pki", s) for s in "abc"}
    ca_pem = creds["a"].ca_pem

    def session(s, cred):
        return SiteSession(s, "r", signer=(cred.cert_pem, cred.key_pem), ca_pem=ca_pem)

    sites = ["a", "b", "c"]
    updates = _updates(sites, 5)
    options = {
        s: {"signer": (creds[s].cert_pem, creds[s].key_pem), "ca_pem": ca_pem} for s in sites
    }
    total, _ = _run(updates, dict.fromkeys(sites, 1.0), 2, ca=options)
    np.testing.assert_allclose(
        total["b"], _weighted_sum(updates, dict.fromkeys(sites, 1.0), sites)["b"], atol=1e-6
    )

    honest = [session(s, creds[s]) for s in sites]
    roster = [h.advertise() for h in honest]
    # an orchestrator swapping in keys of its own, signed by another CA's "c"
    fake = session("c", pki.load(rogue, "a")).advertise()
    fake = secagg.sign_keys(fake, "r", pki.load(rogue, "a").cert_pem, pki.load(rogue, "a").key_pem)
    with pytest.raises(SecAggError, match="fail verification"):
        honest[0].share([roster[0], roster[1], fake], 2)
    # b's certificate signing keys that claim to be c
    claimed = secagg.AdvertisedKeys(
        "c",
        *[
            getattr(roster[1], f)
            for f in ("cipher_public_key", "mask_public_key", "self_mask_commitment")
        ],
    )
    claimed = secagg.sign_keys(claimed, "r", creds["b"].cert_pem, creds["b"].key_pem)
    with pytest.raises(SecAggError, match="signed by a certificate of"):
        secagg.verify_keys(claimed, "r", ca_pem)
    # a valid signature for another round does not carry over
    with pytest.raises(SecAggError, match="fail verification"):
        secagg.verify_keys(roster[1], "another round", ca_pem)
