"""The provider index as the PEC network publishes it: a signed LDIF file (S/MIME or CMS, signed by
openssl as an index authority would), refreshed from a real HTTP server on loopback, read from a
real OpenLDAP slapd on loopback, and this provider's own entry exported as LDIF.

Attacks on the index (unsigned, wrongly signed, altered, huge, empty...) are in
test_attack_index_poisoning.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from pecd.clock import SystemClock
from pecd.config import load as load_config
from pecd.points.relay import RelayStage, Router
from pecd.store.db import Database, open_database
from pecd.store.queue import Item
from pecd.trust import index, index_ldif, pki
from pecd.trust.index import Provider, ProviderIndex
from pecd.trust.index_sync import IndexRefresher

from .conftest import ProviderDir, exchange_cards, make_provider, running, submit, wait_for
from .index_support import (
    FORMS,
    Authority,
    cert_of,
    directory,
    entry,
    http_server,
    make_authority,
    set_index_config,
    sha1_of,
    sign,
)

REPO = Path(__file__).resolve().parents[1]
SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"


def _providers(p: ProviderDir) -> list[Provider]:
    conn = open_database(p.root / "data" / "pecd.sqlite")
    try:
        return index.load_all(conn)
    finally:
        conn.close()


def _ledger(p: ProviderDir, event: str) -> list[dict[str, object]]:
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        return [json.loads(r[0]) for r in conn.execute(
            "SELECT detail FROM ledger WHERE event=? ORDER BY seq", (event,))]
    finally:
        conn.close()


@pytest.fixture
def provider(tmp_path: Path) -> ProviderDir:
    return make_provider(tmp_path, "a.test", tmp_path / "ca")


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return make_authority(tmp_path / "authority")


def _peer_cert(tmp_path: Path, domain: str = "peer.test") -> x509.Certificate:
    ca = pki.CertAuthority.load_or_create(tmp_path / "peer-ca")
    return ca.issue_signing_cert(pki.new_key("ec"), f"Peer {domain}", f"posta-certificata@{domain}")


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("form", [
    "9138d0cd9e2745932effc9f6d9b108cce07c568f",
    "9138D0CD9E2745932EFFC9F6D9B108CCE07C568F",
    "91:38:D0:CD:9E:27:45:93:2E:FF:C9:F6:D9:B1:08:CC:E0:7C:56:8F",
    "91 38 d0 cd 9e 27 45 93 2e ff c9 f6 d9 b1 08 cc e0 7c 56 8f",
    "sha1:9138d0cd9e2745932effc9f6d9b108cce07c568f",
    "SHA-1:91:38:d0:cd:9e:27:45:93:2e:ff:c9:f6:d9:b1:08:cc:e0:7c:56:8f",
    "{SHA1}9138d0cd9e2745932effc9f6d9b108cce07c568f",
    "  9138d0cd9e2745932effc9f6d9b108cce07c568f  ",
    bytes.fromhex("9138d0cd9e2745932effc9f6d9b108cce07c568f"),
])
def test_certificate_hash_textual_forms_are_one_hash(form: str | bytes) -> None:
    assert index_ldif.normalize_hash(form) == "9138d0cd9e2745932effc9f6d9b108cce07c568f"


@pytest.mark.parametrize("bad", ["", "9138d0cd", "sha256:" + "ab" * 32, "zz" * 20,
                                 "9138d0cd9e2745932effc9f6d9b108cce07c568f00"])
def test_certificate_hash_that_is_no_sha1_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        index_ldif.normalize_hash(bad)


def test_hash_only_entry_recognises_the_signer(tmp_path: Path) -> None:
    cert = _peer_cert(tmp_path)
    colons = ":".join(sha1_of(cert)[i:i + 2] for i in range(0, 40, 2)).upper()
    providers, skipped = index_ldif.parse_ldif(directory(
        entry("Peer", ["peer.test"], hashes_=[f"sha1:{colons}"], mail_receipt="posta-certificata@peer.test")))
    assert skipped == []
    view = ProviderIndex(providers)
    found = view.for_certificate(cert)
    assert found is not None and found.name == "Peer" and found.domains == ("peer.test",)
    assert found.service_address == "posta-certificata@peer.test"
    assert view.for_certificate(_peer_cert(tmp_path / "other")) is None


def test_renewal_both_certificates_hold_while_both_are_listed(tmp_path: Path) -> None:
    old, new = _peer_cert(tmp_path / "old"), _peer_cert(tmp_path / "new")
    # the old one listed by hash, the new one by certificate (and its own hash)
    both = ProviderIndex(index_ldif.parse_ldif(directory(
        entry("Peer", ["peer.test"], certs=[new], hashes_=[sha1_of(old), sha1_of(new)])))[0])
    assert both.for_certificate(old) is not None
    assert both.for_certificate(new) is not None
    assert both.for_certificate(old) == both.for_certificate(new)  # one provider, one identity
    # the next index lists only the new certificate: the old one no longer holds
    both.replace(index_ldif.parse_ldif(directory(entry("Peer", ["peer.test"], certs=[new])))[0])
    assert both.for_certificate(old) is None
    assert both.for_certificate(new) is not None


def test_entry_with_a_flaw_is_left_out_alone(tmp_path: Path) -> None:
    good = entry("Good", ["good.test"], certs=[_peer_cert(tmp_path)])
    providers, skipped = index_ldif.parse_ldif(directory(
        good,
        entry("No domains", [], hashes_=["ab" * 20]),
        entry("Bad hash", ["bad.test"], hashes_=["not-a-hash"]),
        entry("No certificate", ["nocert.test"]),
        b"dn: providerName=Broken cert,o=postacert\nobjectClass: provider\nproviderName: Broken cert\n"
        b"managedDomains: broken.test\nproviderCertificate:: AAEC\n\n",
    ))
    assert [p.name for p in providers] == ["Good"]
    assert len(skipped) == 4
    assert any("no managedDomains" in s for s in skipped)
    assert any("not a SHA-1" in s for s in skipped)
    assert any("neither providerCertificateHash nor providerCertificate" in s for s in skipped)
    assert any("not a certificate" in s for s in skipped)


@pytest.mark.parametrize("form", FORMS)
def test_signed_index_in_each_form_verifies_and_parses(tmp_path: Path, authority: Authority,
                                                        form: str) -> None:
    cert = _peer_cert(tmp_path)
    text = directory(entry("Peer, S.p.A.", ["peer.test", "PEC.Peer.Test"], certs=[cert]))
    copy = index_ldif.read_signed(sign(text, authority, form), "file", [authority.certificate],
                                  datetime.now(UTC))
    assert "Test PEC Index Authority" in copy.signer
    (p,) = copy.providers
    assert p.name == "Peer, S.p.A." and p.domains == ("peer.test", "pec.peer.test")
    assert p.all_certificates == (cert,)
    assert p.dn == "providerName=Peer\\, S.p.A.,o=postacert"


# --------------------------------------------------------------------------- CLI: import, export


def test_import_signed_ldif_then_list_and_status(provider: ProviderDir, authority: Authority,
                                                tmp_path: Path) -> None:
    cert = _peer_cert(tmp_path)
    signed = tmp_path / "index.ldif.p7m"
    signed.write_bytes(sign(directory(entry("Peer", ["peer.test"], certs=[cert],
                                            mail_receipt="posta-certificata@peer.test")), authority))
    out = provider.cli("index", "import", str(signed), "--authority", str(authority.cert))
    assert "1 providers" in out and "Test PEC Index Authority" in out
    listing = provider.cli("index", "list")
    assert "Peer  peer.test  (domain):25  posta-certificata@peer.test  index" in listing
    assert "a.test" in listing and "card" in listing  # the own card is still there
    status = provider.cli("index", "status")
    assert "index.ldif.p7m" in status and "entries:  1" in status
    (row,) = _ledger(provider, "index-updated")
    assert row["providers"] == 1 and row["kind"] == "ldif"
    # the signed file is kept as received
    conn = open_database(provider.root / "data" / "pecd.sqlite")
    assert index.copy_raw(conn) == signed.read_bytes()
    conn.close()


def test_import_reads_authority_from_config(provider: ProviderDir, authority: Authority,
                                           tmp_path: Path) -> None:
    signed = tmp_path / "index.p7m"
    signed.write_bytes(sign(directory(entry("Peer", ["peer.test"], hashes_=["ab" * 20])),
                            authority, "der"))
    assert "no index-authority certificate" in provider.cli("index", "import", str(signed), ok=False)
    set_index_config(provider.conf, authority_cert=str(authority.cert))
    assert "1 providers" in provider.cli("index", "import", "--ldif", str(signed))


def test_cards_still_import(tmp_path: Path) -> None:
    a = make_provider(tmp_path, "a.test", tmp_path / "ca")
    b = make_provider(tmp_path, "b.test", tmp_path / "ca")
    exchange_cards(a, b)
    card = tmp_path / "b.card"
    card.write_text(b.cli("index", "export"))
    assert "imported Provider b.test" in a.cli("index", "import", "--card", str(card))
    assert any(p.host == "127.0.0.1" and "b.test" in p.domains for p in _providers(a))


def test_export_ldif_round_trips_through_import(tmp_path: Path, authority: Authority) -> None:
    a = make_provider(tmp_path, "a.test", tmp_path / "ca")
    b = make_provider(tmp_path, "b.test", tmp_path / "ca")
    exported = a.cli("index", "export", "--ldif", "--unit", "PEC service",
                     "--location-url", "https://a.test/index.ldif").encode()
    assert b"objectClass: provider" in exported and b"providerCertificate:: " in exported
    assert f"providerCertificateHash: {sha1_of(cert_of(a))}".encode() in exported
    signed = tmp_path / "a.ldif.p7m"
    signed.write_bytes(sign(exported, authority))  # the authority publishes it, signed
    b.cli("index", "import", str(signed), "--authority", str(authority.cert))
    (entry_a,) = [p for p in _providers(b) if p.from_index_copy]
    assert entry_a.name == "Provider a.test" and entry_a.domains == ("a.test",)
    assert entry_a.service_address == "posta-certificata@a.test"
    assert entry_a.unit == "PEC service" and entry_a.ldif_url == "https://a.test/index.ldif"
    assert entry_a.all_certificates == (cert_of(a),)
    assert ProviderIndex(_providers(b)).for_certificate(cert_of(a)) == entry_a
    # and back out again: the same entry, byte for byte
    again = index_ldif.entry_ldif(entry_a, "o=postacert")
    assert index_ldif.parse_ldif(again)[0] == [entry_a]


# --------------------------------------------------------------------------- routing


def test_index_entry_routes_to_the_recipients_domain_on_port_25(provider: ProviderDir,
                                                                tmp_path: Path) -> None:
    providers, _ = index_ldif.parse_ldif(directory(
        entry("Peer", ["peer.test", "other.test"], hashes_=["ab" * 20])))
    view = ProviderIndex(providers)
    cfg = provider.config
    routes = Router(cfg, view).route(["x@peer.test", "y@other.test", "z@peer.test"], "deliver")
    assert sorted((r.rcpts, r.dest.rsplit(":", 1)[1]) for r in routes) == [
        (("x@peer.test", "z@peer.test"), "peer.test"), (("y@other.test",), "other.test")]
    stage = RelayStage(cfg, view, None, None, SystemClock())  # type: ignore[arg-type]
    (dest,) = [r.dest for r in routes if r.rcpts == ("y@other.test",)]
    item = Item(id=1, kind="relay", mail_from="a@a.test", rcpts=("y@other.test",), dest=dest,
                meta={}, attempts=0, spool="", created=0.0)
    hop = stage.hop(item)
    assert (hop.host, hop.port) == ("other.test", 25)


# --------------------------------------------------------------------------- end to end


def test_envelope_from_a_provider_listed_by_hash_only_is_taken_in_charge(
        tmp_path: Path, authority: Authority) -> None:
    """b knows a only from the authority's signed index, by certificate hash: no card."""
    a = make_provider(tmp_path, "a.test", tmp_path / "ca")
    b = make_provider(tmp_path, "b.test", tmp_path / "ca")
    card_b = tmp_path / "b.card"
    card_b.write_text(b.cli("index", "export"))
    a.cli("index", "import", str(card_b))  # a must reach b's inbound port
    a.add_user("alice@a.test", "alice-secret")
    b.add_user("bob@b.test", "bob-secret")
    signed = tmp_path / "index.p7m"
    signed.write_bytes(sign(directory(entry(
        "Provider a.test", ["a.test"], hashes_=["SHA1:" + sha1_of(cert_of(a)).upper()])), authority))
    b.cli("index", "import", str(signed), "--authority", str(authority.cert))
    assert not any(p.cert_pem for p in _providers(b) if "a.test" in p.domains)

    original = (b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: via the index\r\n"
                b"Message-ID: <idx-1@a.test>\r\n\r\nhello\r\n")

    async def go() -> None:
        async with running(a, b) as (svc_a, _svc_b):
            loop = asyncio.get_running_loop()
            code, reply = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                original, svc_a.ports.submission)
            assert code == 250, reply
            await wait_for(lambda: len(b.messages("bob@b.test")) == 1)

    asyncio.run(go())
    (delivered,) = b.messages("bob@b.test")
    assert b"X-Trasporto: posta-certificata" in delivered  # certified, not an anomaly envelope
    assert b"ANOMALIA" not in delivered
    taken = _ledger(b, "taken-in-charge")
    assert taken, "no take-charge row"
    assert not _ledger(b, "anomaly")


# --------------------------------------------------------------------------- refresh over HTTP


def test_refresh_cli_fetches_from_a_real_http_server(provider: ProviderDir, authority: Authority,
                                                     tmp_path: Path) -> None:
    with http_server() as served:
        served.files["/index.p7m"] = (200, sign(directory(entry("Peer", ["peer.test"],
                                                                 hashes_=["ab" * 20])), authority))
        set_index_config(provider.conf, authority_cert=str(authority.cert),
                         url=served.url + "/index.p7m")
        assert "1 providers" in provider.cli("index", "refresh")
        assert served.hits["/index.p7m"] == 1
        # the authority adds a provider: the next refresh has both
        served.files["/index.p7m"] = (200, sign(directory(
            entry("Peer", ["peer.test"], hashes_=["ab" * 20]),
            entry("Second", ["second.test"], hashes_=["cd" * 20])), authority))
        assert "2 providers" in provider.cli("index", "refresh")
        assert {p.name for p in _providers(provider) if p.from_index_copy} == {"Peer", "Second"}


def test_serve_task_refreshes_on_schedule_and_reloads_the_live_view(
        provider: ProviderDir, authority: Authority) -> None:
    with http_server() as served:
        served.files["/i"] = (200, sign(directory(entry("Peer", ["peer.test"], hashes_=["ab" * 20])),
                                        authority))
        set_index_config(provider.conf, authority_cert=str(authority.cert), url=served.url + "/i",
                         refresh_interval=0.2, retry_interval=0.2)
        cfg = load_config(provider.conf)

        async def go() -> None:
            db = Database(cfg.paths.database)
            view = ProviderIndex(db.transact_sync(index.load_all))
            task = asyncio.create_task(IndexRefresher(cfg, db, SystemClock(), view).run())
            try:
                await wait_for(lambda: view.for_domain("peer.test") is not None)
                served.files["/i"] = (200, sign(directory(
                    entry("Renamed", ["peer.test"], hashes_=["ab" * 20])), authority))
                await wait_for(lambda: (p := view.for_domain("peer.test")) is not None
                               and p.name == "Renamed")
                served.files["/i"] = (500, b"down")  # the source fails: the view stays
                hits = served.hits["/i"]
                await wait_for(lambda: served.hits["/i"] >= hits + 2)
                assert view.for_domain("peer.test") is not None
                assert view.for_domain("a.test") is not None  # cards untouched throughout
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                db.close()

        asyncio.run(go())
    assert any("HTTP 500" in str(r["reason"]) for r in _ledger(provider, "index-refused"))


def test_two_nodes_refreshing_at_once_take_the_copy_once(provider: ProviderDir,
                                                        authority: Authority) -> None:
    """Two nodes on one database fetch the same copy at the same moment: one takes it (one
    ``index-updated`` row), the other only reloads; neither refreshes again before it is due."""
    with http_server() as served:
        served.files["/i"] = (200, sign(directory(entry("Peer", ["peer.test"], hashes_=["ab" * 20])),
                                        authority))
        set_index_config(provider.conf, authority_cert=str(authority.cert), url=served.url + "/i")
        cfg = load_config(provider.conf)

        async def go() -> None:
            dbs = [Database(cfg.paths.database) for _ in range(2)]  # one connection per node
            views = [ProviderIndex(db.transact_sync(index.load_all)) for db in dbs]
            nodes = [IndexRefresher(cfg, db, SystemClock(), view)
                     for db, view in zip(dbs, views, strict=True)]
            try:
                results = await asyncio.gather(*(n.refresh_once() for n in nodes))
                assert all(r.ok for r in results)
                assert all(v.for_domain("peer.test") is not None for v in views)
                assert [await n._fresh_for() > 0 for n in nodes] == [True, True]  # not due yet
            finally:
                for db in dbs:
                    db.close()

        asyncio.run(go())
        assert served.hits["/i"] == 2
    assert len(_ledger(provider, "index-updated")) == 1


def test_service_runs_the_refresh_task(provider: ProviderDir, authority: Authority) -> None:
    with http_server() as served:
        served.files["/i"] = (200, sign(directory(entry("Peer", ["peer.test"], hashes_=["ab" * 20])),
                                        authority))
        set_index_config(provider.conf, authority_cert=str(authority.cert), url=served.url + "/i")

        async def go() -> None:
            async with running(provider) as (svc,):
                await wait_for(lambda: svc.index.for_domain("peer.test") is not None)

        asyncio.run(go())


# --------------------------------------------------------------------------- a live LDAP server


@dataclass
class Slapd:
    url: str
    base: str
    root: Path

    def add(self, ldif: bytes) -> None:
        subprocess.run(["ldapadd", "-x", "-H", self.url, "-D", f"cn=admin,{self.base}", "-w", "secret"],
                       input=ldif, check=True, capture_output=True, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One OpenLDAP server for this module, loopback only, with pecd's provider schema."""
    if not Path(SLAPD).exists():
        pytest.fail("slapd is not installed (scripts/setup installs it)")
    root = tmp_path_factory.mktemp("slapd")
    (root / "db").mkdir()
    base = "o=postacert"
    (root / "slapd.conf").write_text(f"""\
include /etc/ldap/schema/core.schema
include {REPO / "conf" / "pec-provider.schema"}
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 16777216
suffix "{base}"
rootdn "cn=admin,{base}"
rootpw secret
directory {root}/db
""")
    port = _free_port()
    url = f"ldap://127.0.0.1:{port}"
    proc = subprocess.Popen([SLAPD, "-f", str(root / "slapd.conf"), "-h", url + "/", "-d", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"slapd exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("slapd did not start listening") from None
                time.sleep(0.05)
        server = Slapd(url, base, root)
        server.add(f"dn: {base}\nobjectClass: top\nobjectClass: organization\no: postacert\n".encode())
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_import_ldap_reads_provider_entries_from_slapd(slapd: Slapd, provider: ProviderDir,
                                                       tmp_path: Path) -> None:
    old, new = _peer_cert(tmp_path / "old", "ldap.test"), _peer_cert(tmp_path / "new", "ldap.test")
    slapd.add(entry("LDAP Peer", ["ldap.test", "pec.ldap.test"], certs=[new],
                    hashes_=[sha1_of(old), sha1_of(new)], mail_receipt="posta-certificata@ldap.test"))
    slapd.add(entry("Hash Only", ["hash.test"], hashes_=["12" * 20]))
    out = provider.cli("index", "import-ldap", slapd.url, "--base", slapd.base)
    assert "2 providers" in out
    view = ProviderIndex(_providers(provider))
    p = view.for_domain("pec.ldap.test")
    assert p is not None and p.name == "LDAP Peer"
    assert p.service_address == "posta-certificata@ldap.test"
    assert p.all_certificates == (new,)
    assert view.for_certificate(old) == p and view.for_certificate(new) == p  # renewal
    assert view.for_domain("hash.test") is not None
    status = provider.cli("index", "status")
    assert "(ldap)" in status and slapd.url in status


def test_export_ldif_loads_into_slapd_and_reads_back(slapd: Slapd, tmp_path: Path) -> None:
    """The exported entry fits the schema a real directory enforces."""
    a = make_provider(tmp_path, "exported.test", tmp_path / "ca")
    slapd.add(a.cli("index", "export", "--ldif", "--location-url", "https://x.test/i.ldif").encode())
    a.cli("index", "import-ldap", slapd.url, "--base", slapd.base)
    mine = ProviderIndex(_providers(a))
    own = [p for p in mine.providers() if p.from_index_copy and "exported.test" in p.domains]
    assert len(own) == 1 and own[0].all_certificates == (cert_of(a),)
    assert own[0].ldif_url == "https://x.test/i.ldif"


def test_refresh_from_ldap_url_in_config(slapd: Slapd, provider: ProviderDir) -> None:
    slapd.add(entry("Config Peer", ["config.test"], hashes_=["34" * 20]))
    set_index_config(provider.conf, url=slapd.url, base=slapd.base)
    assert "providers" in provider.cli("index", "refresh")
    assert ProviderIndex(_providers(provider)).for_domain("config.test") is not None


def test_ldap_server_down_keeps_the_copy(slapd: Slapd, provider: ProviderDir) -> None:
    slapd.add(entry("Kept Peer", ["kept.test"], hashes_=["56" * 20]))
    provider.cli("index", "import-ldap", slapd.url, "--base", slapd.base)
    dead = f"ldap://127.0.0.1:{_free_port()}"
    out = provider.cli("index", "import-ldap", dead, "--base", slapd.base, ok=False)
    assert "index refused" in out and "stays in force" in out
    assert ProviderIndex(_providers(provider)).for_domain("kept.test") is not None


# --------------------------------------------------------------------------- the real network


def test_real_providers_signers_found_by_hash_and_aruba_renewal_both_hold(
        tmp_path: Path, provider: ProviderDir, authority: Authority) -> None:
    """The genuine samples' signers (../shared/pec-samples, read in place), listed in a signed
    index by SHA-1 only: Aruba's 2014 and 2018 certificates (a real renewal) under one entry."""
    from email.utils import parseaddr

    from pecd.trust import cms, smime

    from .realworld import INTACT, sample

    signers: dict[str, tuple[x509.Certificate, str]] = {}
    for name in INTACT:
        data = sample(name)
        signed = smime.split_signed(data)
        checked = cms.check_signed_data(signed.signature, signed.inner_view)
        domain = parseaddr(str(signed.headers["From"]))[1].rpartition("@")[2].lower()
        signers[name] = (checked.signer, domain)
    aruba = {sha1_of(c) for n, (c, _d) in signers.items() if n.startswith("aruba")}
    assert len(aruba) == 2  # 2014 and 2018
    (aruba_domain,) = {d for n, (_c, d) in signers.items() if n.startswith("aruba")}
    (sogei_cert, sogei_domain), *_ = [v for n, v in signers.items() if n.startswith("sogei")]

    def colons(h: str) -> str:
        return ":".join(h[i:i + 2] for i in range(0, 40, 2)).upper()

    signed_index = tmp_path / "real.p7m"
    signed_index.write_bytes(sign(directory(
        entry("Aruba PEC S.p.A.", [aruba_domain], hashes_=[colons(h) for h in sorted(aruba)]),
        entry("Sogei S.p.A.", [sogei_domain], hashes_=[sha1_of(sogei_cert)])), authority, "der"))
    provider.cli("index", "import", str(signed_index), "--authority", str(authority.cert))
    view = ProviderIndex(_providers(provider))
    for name, (cert, domain) in signers.items():
        found = view.for_certificate(cert)
        assert found is not None, name
        assert domain in found.domains, name
    found_2014 = view.for_certificate(signers["aruba-accettazione-2014.eml"][0])
    assert found_2014 == view.for_certificate(signers["aruba-accettazione-2018.eml"][0])
