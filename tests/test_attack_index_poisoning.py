"""Index poisoning: whoever can put a file where pecd reads the provider index (the URL, a MITM on
plain HTTP, a file handed to the operator) tries to make pecd trust a certificate or a domain the
index authority never listed, or to make it forget the providers it knows.

Every attempt must be refused with a clear reason, leave a ``index-refused`` ledger row, and
leave the copy in force exactly as it was: same file, same providers. Nothing crashes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from pathlib import Path

import pytest

from pecd.clock import SystemClock
from pecd.config import load as load_config
from pecd.store.db import Database, open_database
from pecd.trust import index
from pecd.trust.index import ProviderIndex
from pecd.trust.index_sync import IndexRefresher, fetch_url

from .conftest import ProviderDir, make_provider
from .index_support import (
    FORMS,
    Authority,
    directory,
    entry,
    http_server,
    make_authority,
    set_index_config,
    sign,
)

GOOD = directory(entry("Peer", ["peer.test"], hashes_=["ab" * 20],
                       mail_receipt="posta-certificata@peer.test"))
EVIL = directory(entry("Peer", ["peer.test"], hashes_=["ab" * 20]),
                 entry("Evil", ["evil.test", "a.test"], hashes_=["ee" * 20]))


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return make_authority(tmp_path / "authority")


@pytest.fixture
def provider(tmp_path: Path, authority: Authority) -> ProviderDir:
    """A provider with a good copy in force, signed by the configured authority."""
    p = make_provider(tmp_path, "a.test", tmp_path / "ca")
    set_index_config(p.conf, authority_cert=str(authority.cert))
    good = tmp_path / "good.p7m"
    good.write_bytes(sign(GOOD, authority))
    p.cli("index", "import", str(good))
    return p


def _state(p: ProviderDir) -> tuple[str | None, list[str]]:
    """The copy in force: its file's hash and its providers."""
    conn = open_database(p.root / "data" / "pecd.sqlite")
    try:
        info = index.copy_info(conn)
        return (info.sha256 if info else None,
                sorted(f"{x.name}:{','.join(x.domains)}" for x in index.load_copy_entries(conn)))
    finally:
        conn.close()


def _refusals(p: ProviderDir) -> list[str]:
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        return [str(json.loads(r[0])["reason"]) for r in conn.execute(
            "SELECT detail FROM ledger WHERE event='index-refused' ORDER BY seq")]
    finally:
        conn.close()


def _attempt(p: ProviderDir, tmp_path: Path, data: bytes, *args: str) -> str:
    """Import ``data`` as the attacker hands it over; assert it changed nothing; return the error."""
    before = _state(p)
    refusals = len(_refusals(p))
    bad = tmp_path / f"attack-{time.monotonic_ns()}.p7m"
    bad.write_bytes(data)
    out = p.cli("index", "import", str(bad), *args, ok=False)
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out
    assert "stays in force" in out
    assert _state(p) == before
    assert len(_refusals(p)) == refusals + 1
    return out


def test_index_poisoning_unsigned_ldif_is_refused(provider: ProviderDir, tmp_path: Path) -> None:
    out = _attempt(provider, tmp_path, EVIL)
    assert "unsigned LDIF" in out
    out = _attempt(provider, tmp_path, EVIL, "--ldif")
    assert "unsigned LDIF" in out


@pytest.mark.parametrize("form", FORMS)
def test_index_poisoning_signed_by_a_lookalike_authority_is_refused(
        provider: ProviderDir, tmp_path: Path, form: str) -> None:
    """Same name as the real authority, another key: the signature cannot lead to the configured
    certificate."""
    impostor = make_authority(tmp_path / f"impostor-{form}")  # same subject by default
    out = _attempt(provider, tmp_path, sign(EVIL, impostor, form))
    assert "signature does not hold" in out


def test_index_poisoning_signed_by_a_provider_key_is_refused(provider: ProviderDir,
                                                              tmp_path: Path) -> None:
    """A provider's own signing key (a certificate from a CA the provider trusts for mail) is not
    the index authority."""
    keys = provider.root / "keys"
    as_provider = Authority(keys / "signing.pem", keys / "signing.key")
    out = _attempt(provider, tmp_path, sign(EVIL, as_provider))
    assert "signature does not hold" in out


def _alter(data: bytes, form: str) -> bytes:
    """``peer.test`` becomes ``evil.test`` (same length) inside the signed content."""
    if form == "der":
        assert b"peer.test" in data
        return data.replace(b"peer.test", b"evil.test")
    if form == "pem":
        lines = data.strip().splitlines()
        der = base64.b64decode(b"".join(lines[1:-1])).replace(b"peer.test", b"evil.test")
        return lines[0] + b"\n" + base64.encodebytes(der) + lines[-1] + b"\n"
    if form == "smime-opaque":
        head, _, body = data.partition(b"\n\n")
        der = base64.b64decode(b"".join(body.split())).replace(b"peer.test", b"evil.test")
        return head + b"\n\n" + base64.encodebytes(der)
    assert b"peer.test" in data
    return data.replace(b"peer.test", b"evil.test")


@pytest.mark.parametrize("form", FORMS)
def test_index_poisoning_content_altered_after_signing_is_refused(
        provider: ProviderDir, authority: Authority, tmp_path: Path, form: str) -> None:
    altered = _alter(sign(GOOD, authority, form), form)
    out = _attempt(provider, tmp_path, altered)
    assert "signature does not hold" in out or "malformed" in out


def test_index_poisoning_malformed_content_is_refused(provider: ProviderDir, authority: Authority,
                                                      tmp_path: Path) -> None:
    # well signed, but not LDIF inside
    out = _attempt(provider, tmp_path, sign(b"objectClass: provider\nno dn here\n", authority, "der"))
    assert "malformed LDIF" in out or "no usable provider" in out
    out = _attempt(provider, tmp_path, sign(b"\x00\x01binary junk\xff\xfe\n", authority, "der"))
    assert "index refused" in out
    # not even a signature: DER-looking garbage, truncated CMS, a broken S/MIME message
    out = _attempt(provider, tmp_path, b"\x30\x82\xff\xff" + b"\x00" * 64)
    assert "index refused" in out
    out = _attempt(provider, tmp_path, sign(GOOD, authority, "der")[:200])
    assert "index refused" in out
    smime = sign(GOOD, authority, "smime-detached")
    out = _attempt(provider, tmp_path, smime[: smime.rindex(b"------")])  # no close delimiter
    assert "signature does not hold" in out
    out = _attempt(provider, tmp_path, b"-----BEGIN CMS-----\n!!!!\n-----END CMS-----\n")
    assert "index refused" in out
    out = _attempt(provider, tmp_path, b"Subject: hello\r\n\r\nplain mail\r\n")
    assert "not a signed index" in out


def test_index_poisoning_empty_index_is_refused(provider: ProviderDir, authority: Authority,
                                                tmp_path: Path) -> None:
    """A signed file with no provider would make pecd forget every provider at once."""
    out = _attempt(provider, tmp_path, sign(directory(), authority))
    assert "no usable provider entry" in out
    broken_only = directory(entry("Broken", [], hashes_=["ab" * 20]))
    out = _attempt(provider, tmp_path, sign(broken_only, authority))
    assert "no usable provider entry" in out and "no managedDomains" in out


def test_index_poisoning_huge_file_is_refused(provider: ProviderDir, authority: Authority,
                                              tmp_path: Path) -> None:
    set_index_config(provider.conf, max_size=4096)
    many = directory(*(entry(f"P{i}", [f"p{i}.test"], hashes_=[f"{i:040x}"]) for i in range(200)))
    out = _attempt(provider, tmp_path, sign(many, authority))
    assert "over the limit of 4096" in out


def test_index_poisoning_huge_download_is_cut_short(provider: ProviderDir) -> None:
    """A server that declares, or just sends, more than max_size: refused without reading it all."""
    with http_server() as served:
        served.files["/declared"] = (200, b"x" * 10_000)
        served.streams["/endless"] = 1 << 40
        set_index_config(provider.conf, max_size=4096, url=served.url + "/declared")
        before = _state(provider)
        out = provider.cli("index", "refresh", ok=False)
        assert "10000 bytes, over the limit of 4096" in out
        out = provider.cli("index", "refresh", "--url", served.url + "/endless", ok=False)
        assert "over the limit of 4096" in out
        assert _state(provider) == before
        with pytest.raises(index.IndexError_, match="over the limit"):
            fetch_url(served.url + "/endless", 1 << 20, 10)


def test_index_poisoning_replayed_older_index_is_refused(provider: ProviderDir,
                                                         authority: Authority,
                                                         tmp_path: Path) -> None:
    """An index signed before the one in force (it may still list a withdrawn certificate) is
    not taken, however good its signature."""
    old = sign(EVIL, authority, days_ago=1)  # as published yesterday (faketime)
    newer = tmp_path / "newer.p7m"
    newer.write_bytes(sign(GOOD, authority))
    provider.cli("index", "import", str(newer))
    out = _attempt(provider, tmp_path, old)
    assert "old index replayed" in out


def test_index_poisoning_http_failures_keep_the_copy(provider: ProviderDir, authority: Authority,
                                                     tmp_path: Path) -> None:
    with http_server() as served:
        served.files["/i"] = (404, b"gone")
        set_index_config(provider.conf, url=served.url + "/i")
        before = _state(provider)
        assert "HTTP 404" in provider.cli("index", "refresh", ok=False)
        served.files["/i"] = (200, sign(EVIL, make_authority(tmp_path / "impostor")))
        assert "signature does not hold" in provider.cli("index", "refresh", ok=False)
        url = served.url
    # the server is gone now
    out = provider.cli("index", "refresh", "--url", url + "/i", ok=False)
    assert "index refused" in out and "stays in force" in out
    assert _state(provider) == before
    assert len(_refusals(provider)) == 3


def test_index_poisoning_during_serve_keeps_the_live_view(provider: ProviderDir,
                                                          tmp_path: Path) -> None:
    """The scheduled refresh meets a poisoned file: the running service keeps trusting what it
    trusted, and goes on refreshing."""
    with http_server() as served:
        served.files["/i"] = (200, sign(EVIL, make_authority(tmp_path / "impostor")))
        set_index_config(provider.conf, url=served.url + "/i", refresh_interval=0.2,
                         retry_interval=0.2)
        cfg = load_config(provider.conf)

        async def go() -> None:
            db = Database(cfg.paths.database)
            view = ProviderIndex(db.transact_sync(index.load_all))
            task = asyncio.create_task(IndexRefresher(cfg, db, SystemClock(), view).run())
            try:
                while served.hits.get("/i", 0) < 3:
                    await asyncio.sleep(0.02)
                assert not task.done()
                assert view.for_domain("evil.test") is None
                assert view.for_domain("peer.test") is not None
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                db.close()

        asyncio.run(go())
    assert all("signature does not hold" in r for r in _refusals(provider))
