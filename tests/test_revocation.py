"""Revocation material for peers' signing certificates: a real CA (cryptography) issuing
certificates with a CRL distribution point and an OCSP responder, its CRL served by a real HTTP
server on loopback, ``openssl ocsp`` as the real responder, pecd.trust.revocation fetching, checking,
caching (in the database, across restarts) and judging with pyhanko-certvalidator."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pecd.clock import ManualClock
from pecd.store.db import Database
from pecd.trust import revocation

from .attack_support import BOB, kind_of, ledger_rows, serving, wait_until
from .pechelpers import configure, queued
from .revocation_support import (
    SETTINGS,
    CrlServer,
    OcspResponder,
    RevocationCA,
    gather,
    revoking_pair,
    send_certified,
)


def test_crl_cached_until_next_update_and_kept_across_restarts(
        tmp_path: Path, ca: RevocationCA, crl_server: CrlServer) -> None:
    _key, _path, cert = ca.issue("Provider a.test", "posta-certificata@a.test", "a", ocsp=False)
    crl_server.files["/ca.crl"] = ca.crl()
    clock = ManualClock()
    db = Database(tmp_path / "pecd.sqlite")
    try:
        sources = revocation.Sources(SETTINGS, clock, db)
        first = gather(sources, cert, ca.cert)
        assert first.known and first.problems == () and len(first.info.crls) == 1
        assert revocation.judge([cert, ca.cert], [ca.cert], [first], clock.now()).state == "good"
        assert gather(sources, cert, ca.cert).info == first.info
        assert crl_server.hits["/ca.crl"] == 1  # the copy in force, not a second download
        assert sources.errors == {"crl": 0, "ocsp": 0}  # /metrics' pecd_revocation_fetch_errors
    finally:
        db.close()
    crl_server.stop()  # the source goes down; the copy kept in the database still holds
    db = Database(tmp_path / "pecd.sqlite")
    try:
        restarted = revocation.Sources(SETTINGS, clock, db)
        restarted.load()
        again = gather(restarted, cert, ca.cert)
        assert again.known and again.info.crls == first.info.crls and again.problems == ()
        clock.advance(timedelta(minutes=61))  # past nextUpdate: nothing in force any more
        stale = gather(restarted, cert, ca.cert)
        assert not stale.known
        assert "unreachable" in stale.problems[0]
        assert restarted.errors == {"crl": 1, "ocsp": 0}
        assert revocation.judge([cert, ca.cert], [ca.cert], [stale], clock.now()).state == "unknown"
    finally:
        db.close()


def test_revoked_in_the_crl_is_revoked_from_its_revocation_date(
        ca: RevocationCA, crl_server: CrlServer) -> None:
    _key, _path, cert = ca.issue("Provider a.test", "posta-certificata@a.test", "a", ocsp=False)
    revoked_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    ca.revoke(cert, revoked_at)
    crl_server.files["/ca.crl"] = ca.crl()
    sources = revocation.Sources(SETTINGS, ManualClock())
    material = gather(sources, cert, ca.cert)
    now = revocation.judge([cert, ca.cert], [ca.cert], [material], datetime.now(UTC))
    assert now.state == "revoked" and now.refused
    assert f"revoked at {revoked_at:%H:%M:%S} on {revoked_at:%Y-%m-%d}" in now.reason, now
    assert now.kind == "revoked"
    assert "compromise" in now.reason.lower()
    before = revocation.judge([cert, ca.cert], [ca.cert], [material], revoked_at - timedelta(minutes=5))
    assert before.state == "good", before  # signed before the revocation: it held then
    again = revocation.judge([cert, ca.cert], [ca.cert], [material], datetime.now(UTC))
    assert again.state == "revoked"  # that good answer was for its time only, not remembered


def test_ocsp_from_openssl_responder(tmp_path: Path, ca: RevocationCA) -> None:
    """Certificates that name only an OCSP responder: ``openssl ocsp`` answers for each."""
    _k1, _p1, fine = ca.issue("Provider a.test", "posta-certificata@a.test", "a", crl=False)
    _k2, _p2, bad = ca.issue("Provider c.test", "posta-certificata@c.test", "c", crl=False)
    ca.revoke(bad)
    responder = OcspResponder(ca, int(ca.ocsp_url.rsplit(":", 1)[1].strip("/")))
    responder.start()
    try:
        sources = revocation.Sources(SETTINGS, ManualClock())
        good_material = gather(sources, fine, ca.cert)
        bad_material = gather(sources, bad, ca.cert)
    finally:
        responder.stop()
    assert good_material.known and len(good_material.info.ocsps) == 1, good_material.problems
    fine_status = revocation.judge([fine, ca.cert], [ca.cert], [good_material], datetime.now(UTC))
    assert fine_status.state == "good", fine_status
    verdict = revocation.judge([bad, ca.cert], [ca.cert], [bad_material], datetime.now(UTC))
    assert verdict.state == "revoked" and "revoked at" in verdict.reason, verdict
    # the responder is gone now: the answers stay in force until their nextUpdate
    again = asyncio.run(sources.material(bad, ca.cert))
    assert again.info.ocsps == bad_material.info.ocsps and again.problems == ()


def test_ocsp_answer_for_another_certificate_is_refused(tmp_path: Path, ca: RevocationCA) -> None:
    _k1, _p1, one = ca.issue("Provider a.test", "posta-certificata@a.test", "a", crl=False)
    _k2, _p2, two = ca.issue("Provider c.test", "posta-certificata@c.test", "c", crl=False)
    responder = OcspResponder(ca, int(ca.ocsp_url.rsplit(":", 1)[1].strip("/")))
    responder.start()
    try:
        material = gather(revocation.Sources(SETTINGS, ManualClock()), one, ca.cert)
    finally:
        responder.stop()
    answer = material.info.ocsps[0]
    now = datetime.now(UTC)
    with pytest.raises(revocation.RevocationError, match="not about this certificate"):
        revocation.check_ocsp(answer, two, ca.cert, now, "k", None)
    with pytest.raises(revocation.RevocationError, match="malformed OCSP"):
        revocation.check_ocsp(b"\x30\x03\x0a\x01\x00junk", one, ca.cert, now, "k", None)


def test_unknown_status_defers_until_the_grace_is_over(tmp_path: Path, ca: RevocationCA) -> None:
    """The policy, on its own: defer while unknown and within the grace (kept in the database
    across a restart), then accept for the anomaly envelope; "anomaly" never defers."""
    _key, _path, cert = ca.issue("Provider a.test", "posta-certificata@a.test", "a")
    unknown = revocation.Status("unknown", "revocation status unknown: down")
    clock = ManualClock()
    settings = replace(SETTINGS, revocation_grace=600.0)
    db = Database(tmp_path / "pecd.sqlite")
    try:
        checker = revocation.Checker(settings, revocation.Sources(settings, clock, db),
                                     _no_index(), [ca.cert], clock, None)
        assert asyncio.run(checker.decide(cert, unknown)).action == "defer"
        clock.advance(timedelta(seconds=300))
    finally:
        db.close()
    db = Database(tmp_path / "pecd.sqlite")
    try:
        checker = revocation.Checker(settings, revocation.Sources(settings, clock, db),
                                     _no_index(), [ca.cert], clock, None)
        later = asyncio.run(checker.decide(cert, unknown))
        assert later.action == "defer" and later.unknown_for == 300.0
        clock.advance(timedelta(seconds=301))
        over = asyncio.run(checker.decide(cert, unknown))
        assert over.action == "accept" and over.status.state == "unknown"
        # known again: a later outage starts a grace of its own
        assert asyncio.run(checker.decide(cert, revocation.Status("good"))).action == "accept"
        assert asyncio.run(checker.decide(cert, unknown)).action == "defer"
        strict = revocation.Checker(replace(settings, revocation="anomaly"),
                                    revocation.Sources(settings, clock, db), _no_index(),
                                    [ca.cert], clock, None)
        assert asyncio.run(strict.decide(cert, unknown)).action == "accept"
    finally:
        db.close()


def _no_index() -> revocation.ProviderIndex:
    return revocation.ProviderIndex([])


# --------------------------------------------------------------------------- two providers


def test_source_down_defers_the_peer_until_the_crl_is_back(
        tmp_path: Path, ca: RevocationCA, crl_server: CrlServer) -> None:
    """The CRL server is down and nothing is cached: b.test answers ``451`` at DATA (a
    ``revocation-deferred`` row), a.test's relay retries; once the CRL is served again the
    envelope is taken in charge. Nothing was accepted while the status was unknown."""
    a, b, _cert = revoking_pair(tmp_path, ca, ocsp=False)
    configure(b, "reception", revocation_retry=0.0)
    crl_server.stop()
    with serving(a, b) as (svc_a, _svc_b):
        send_certified(a, svc_a.ports.submission, "mentre la CRL non risponde")
        wait_until(lambda: len(ledger_rows(b, "revocation-deferred")) >= 2, what="451 twice")
        assert b.messages(BOB) == [] and queued(b) == 0  # nothing accepted, nothing queued
        crl_server.files["/ca.crl"] = ca.crl()
        crl_server.start()
        wait_until(lambda: len(b.messages(BOB)) == 1, what="bob's mailbox")
    assert [kind_of(m) for m in b.messages(BOB)] == ["posta-certificata"]
    deferred = ledger_rows(b, "revocation-deferred")
    assert "unreachable" in deferred[0]["detail"]["reason"]
    assert deferred[0]["recipients"] == [BOB]
    assert len(ledger_rows(b, "taken-in-charge")) == 1 and ledger_rows(b, "anomaly") == []


@pytest.mark.parametrize("policy", [{"revocation_grace": 0.0}, {"revocation": "anomaly"}],
                         ids=["grace-over", "anomaly-at-once"])
def test_unknown_status_past_the_grace_is_an_anomaly_never_certified(
        tmp_path: Path, ca: RevocationCA, crl_server: CrlServer, policy: dict[str, Any]) -> None:
    a, b, _cert = revoking_pair(tmp_path, ca, ocsp=False)
    configure(b, "reception", **policy)
    crl_server.files["/ca.crl"] = b"down for maintenance"  # malformed: no status either
    with serving(a, b) as (svc_a, _svc_b):
        send_certified(a, svc_a.ports.submission, "stato sconosciuto")
        wait_until(lambda: len(b.messages(BOB)) == 1, what="bob's mailbox")
    assert [kind_of(m) for m in b.messages(BOB)] == ["errore"]
    reasons = [r["detail"]["reason"] for r in ledger_rows(b, "anomaly")]
    assert len(reasons) == 1 and "revocation status unknown" in reasons[0], reasons
    assert "malformed CRL" in reasons[0]
    assert ledger_rows(b, "revocation-deferred") == [] and ledger_rows(b, "taken-in-charge") == []


def test_revocation_policy_must_be_a_known_one(tmp_path: Path) -> None:
    from pecd.config import ConfigError, load

    conf = tmp_path / "pecd.toml"
    conf.write_text('[provider]\nname = "P"\ndomains = ["p.test"]\n\n'
                    '[reception]\nrevocation = "accept"\n')
    with pytest.raises(ConfigError, match=r'\[reception\] revocation must be "defer"'):
        load(conf)
    conf.write_text('[provider]\nname = "P"\ndomains = ["p.test"]\n\n'
                    '[reception]\nrevocation = "anomaly"\nrevocation_grace = 60.0\n')
    assert load(conf).reception.revocation == "anomaly"
    assert load(conf).reception.revocation_grace == 60.0
