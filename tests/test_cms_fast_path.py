"""The fast verification path (pecd.trust.der, cms._check_fast, tsa._tst_info_fast) against the
generic asn1crypto path it stands in for, with openssl as the outside judge.

The fast path may only ever accept what the generic path accepts, with the same result; anything
else it must hand over. These tests feed both paths pecd's own signatures, openssl's, crafted
ones and thousands of corrupted copies, and compare.
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms

from pecd.trust import cms, der, tsa

from .test_cms import DATA, Provider, openssl, openssl_verify_detached, prov, stranger

__all__ = ["prov", "stranger"]  # fixtures, imported for pytest


def _both(sig: bytes, data: bytes | None, **kw: object) -> tuple[object, object]:
    """(fast result or the exception type, generic result or the exception type)."""
    out: list[object] = []
    for path in (cms._check_fast, cms._check_generic):
        try:
            out.append(path(sig, data, kw.get("extra", ()), bool(kw.get("ess", False)),
                            cms.DEFAULT_POLICY))
        except Exception as exc:  # the type is what is compared
            out.append(type(exc))
    return out[0], out[1]


def test_fast_path_reads_our_signatures_and_tokens_as_the_generic_path_does(
        prov: Provider, tmp_path: Path) -> None:
    for n in range(5):
        data = DATA + b"x" * n
        sig = prov.signer().sign_detached(data)
        fast, generic = _both(sig, data)
        assert isinstance(fast, cms._Checked), fast  # our own shape is the usual one
        assert fast == generic
        assert openssl_verify_detached(prov, tmp_path, sig, data)
        token, value = cms.extract_timestamp_token(sig) or (b"", b"")
        fast_t, generic_t = _both(token, None, extra=[prov.tsa.certificate], ess=True)
        assert isinstance(fast_t, cms._Checked) and fast_t == generic_t
        assert fast_t.econtent is not None
        assert tsa._tst_info_fast(fast_t.econtent) == tsa._tst_info(fast_t.econtent)
        (tmp_path / "tok.der").write_bytes(token)
        (tmp_path / "value.bin").write_bytes(value)
        r = openssl("ts", "-verify", "-in", tmp_path / "tok.der", "-token_in", "-data",
                    tmp_path / "value.bin", "-CAfile", prov.ca_pem, "-untrusted", prov.tsa_pem)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("md", ["sha1", "sha256", "sha512"])
def test_fast_path_agrees_on_openssl_made_signatures(prov: Provider, tmp_path: Path, md: str) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    r = openssl("cms", "-sign", "-binary", "-md", md, "-in", tmp_path / "data.bin",
                "-signer", prov.dir / "signing.pem", "-inkey", prov.dir / "signing.key",
                "-outform", "DER", "-out", tmp_path / "sig.der")
    assert r.returncode == 0, r.stderr
    sig = (tmp_path / "sig.der").read_bytes()
    fast, generic = _both(sig, DATA)
    assert isinstance(generic, cms._Checked)
    assert fast == generic  # openssl writes DER with issuerAndSerialNumber: read fast too
    fast, generic = _both(sig, DATA + b"!")
    assert generic is cms.ContentAltered and not isinstance(fast, cms._Checked)
    with pytest.raises(cms.ContentAltered, match="messageDigest does not match"):
        cms.check_signed_data(sig, DATA + b"!")  # the generic path's answer and message


def test_fast_path_never_accepts_what_the_generic_path_refuses(prov: Provider) -> None:
    """Every single-byte corruption of a genuine signature (and of its token): whenever the fast
    path accepts, the generic path accepts the same; the fast path's refusals go to the generic
    path, so what check_signed_data answers is always the generic answer."""
    sig = prov.signer().sign_detached(DATA)
    token, _ = cms.extract_timestamp_token(sig) or (b"", b"")
    rng = random.Random(7)
    for original, data, kw in ((sig, DATA, {}),
                               (token, None, {"extra": [prov.tsa.certificate], "ess": True})):
        spots = rng.sample(range(len(original)), min(300, len(original)))
        for i in spots:
            bad = bytearray(original)
            bad[i] ^= 1 << rng.randrange(8)
            fast, generic = _both(bytes(bad), data, **kw)  # type: ignore[arg-type]
            if isinstance(fast, cms._Checked):
                assert fast == generic, i
        # truncation and trailing bytes
        for bad_bytes in (original[:-1], original + b"\x00", original[:40]):
            fast, generic = _both(bad_bytes, data, **kw)  # type: ignore[arg-type]
            assert not isinstance(fast, cms._Checked) or fast == generic


def test_a_name_spelled_differently_goes_the_generic_way(prov: Provider) -> None:
    """An issuer written with another string type is the same name under RFC 5280 but not the
    same bytes: the fast path hands it over and the generic path still finds the signer."""
    sig = prov.signer(ts=False).sign_detached(DATA)
    ci = asn1_cms.ContentInfo.load(sig)
    issuer = ci["content"]["signer_infos"][0]["sid"].chosen["issuer"]
    raw = bytes(issuer.dump())
    # PrintableString (0x13) / UTF8String (0x0c) of the CN: swap the first one found
    spelled = raw.replace(b"\x0c", b"\x13", 1) if b"\x0c" in raw else raw.replace(b"\x13", b"\x0c", 1)
    assert spelled != raw
    at = sig.index(raw, sig.index(raw) + 1)  # the certificate's own issuer comes first
    respelled = sig[:at] + spelled + sig[at + len(raw):]
    with pytest.raises(cms._Unusual):
        cms._check_fast(respelled, DATA, (), False, cms.DEFAULT_POLICY)
    # the signature does not cover the sid, so the generic path verifies it
    checked = cms.check_signed_data(respelled, DATA)
    assert checked.signer == prov.cert


def test_der_reader_refuses_what_is_not_plain_der() -> None:
    for bad in (b"\x30\x80\x00\x00",  # indefinite length
                b"\x30\x81\x05abcde",  # non-minimal length
                b"\x30\x03ab",  # truncated
                b"\x1f\x01\x00",  # long-form tag
                b"\x30\x00\x00"):  # trailing byte
        with pytest.raises(der.NotDer):
            der.whole(bad, 0x30)
    for bad_int in (b"\x00\x01", b"\xff\x80", b""):
        with pytest.raises(der.NotDer):
            der.integer(bad_int, 0, len(bad_int))
    assert der.integer(b"\x00\x80", 0, 2) == 128
    assert der.oid_dotted(cms._oid(cms.ID_SIGNED_DATA)[2:]) == cms.ID_SIGNED_DATA
    assert der.oid_dotted(cms._oid("2.999.3")[2:]) == "2.999.3"


def test_token_times_with_fractions_read_as_asn1crypto_reads_them(prov: Provider) -> None:
    for when in (datetime(2026, 1, 2, 3, 4, 5, 0, UTC), datetime(2026, 1, 2, 3, 4, 5, 120000, UTC)):
        clock = type("C", (), {"now": staticmethod(lambda w=when: w)})()
        local = tsa.LocalTSA(prov.tsa._core.key, prov.tsa.certificate, clock)  # type: ignore[arg-type]
        token = local.timestamp(b"data")
        checked = cms.check_signed_data(token, None, extra_certs=[prov.tsa.certificate], require_ess=True)
        assert checked.econtent is not None
        fast = tsa._tst_info_fast(checked.econtent)
        assert fast == tsa._tst_info(checked.econtent)
        assert fast[2] == when and fast[1] == hashlib.sha256(b"data").digest()


def test_the_signer_is_found_without_a_tree_as_with_one(prov: Provider, tmp_path: Path) -> None:
    """revocation.signed_by (the cheap look before the judgement) reads the usual shape through
    cms.included_signer: the same signer and certificates as its asn1crypto reading."""
    from pecd.trust import revocation

    sig = prov.signer().sign_detached(DATA)
    signer, included = cms.included_signer(sig)
    assert signer == prov.cert and included == [prov.cert]
    signed = revocation.signed_by(sig)
    assert signed is not None and signed.signer == prov.cert and signed.others == ()
    # a signature without the signer's certificate: neither way finds it
    bare = cms._SignerCore(prov.key, prov.cert)
    attrs, value = bare.sign_attrs([cms.der_attribute(
        cms.ID_MESSAGE_DIGEST, cms._der_tlv(0x04, hashlib.sha256(DATA).digest()))])
    without = bare.content_info(cms.ID_DATA, None, attrs, value, include_certs=False)
    with pytest.raises(cms._Unusual):
        cms.included_signer(without)
    assert revocation.signed_by(without) is None
