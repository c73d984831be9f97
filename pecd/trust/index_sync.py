"""Bringing the index authority's directory in: a signed LDIF file over HTTP(S), or entries read
from an LDAP server, on the operator's command or on a schedule inside ``pecd serve``.

Receives bytes from the network and trusts none of them until ``pecd.trust.index_ldif`` has checked the
signature under the configured index-authority certificate (a live LDAP read has no signature:
the operator trusts the server named in the configuration, ideally over ``ldaps://``). May touch:
the network (blocking calls, run in an executor by the async task) and the index copy through
``pecd.trust.index``'s storage functions. A refresh that fails for any reason leaves the copy in force
untouched and says why, in the log and in a ledger row; the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from pecd.clock import Clock
from pecd.config import Config, IndexSource
from pecd.store import Connection, ledger
from pecd.store.db import Database
from pecd.trust import index, index_ldif, pki
from pecd.trust.index import IndexCopy
from pecd.trust.index_ldif import IndexRefused

log = logging.getLogger("pecd.index")

LDAP_ATTRIBUTES = ("objectClass", "providerName", "providerUnit", "mailReceipt", "managedDomains",
                   "providerCertificateHash", "providerCertificate", "LDIFLocationURL")


def authority_certs(source: IndexSource, override: Path | None = None) -> list[x509.Certificate]:
    path = override or source.authority_cert
    if path is None:
        raise IndexRefused("no index-authority certificate: set [index] authority_cert")
    try:
        return pki.load_certs(path)
    except pki.PKIError as exc:
        raise IndexRefused(f"index-authority certificate: {exc}") from None


# --------------------------------------------------------------------------- HTTP


def fetch_url(url: str, max_size: int, timeout: float) -> bytes:
    """The body at ``url`` (blocking). Refuses a body over ``max_size`` without reading it all."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise IndexRefused(f"index URL scheme {scheme!r} is not http or https")
    request = urllib.request.Request(url, headers={"User-Agent": "pecd-index-refresh"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # scheme checked above
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_size:
                raise IndexRefused(f"index file is {declared} bytes, over the limit of {max_size}")
            chunks: list[bytes] = []
            total = 0
            while chunk := response.read(65536):
                total += len(chunk)
                if total > max_size:
                    raise IndexRefused(f"index file is over the limit of {max_size} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise IndexRefused(f"fetching {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise IndexRefused(f"fetching {url}: {reason}") from None


# --------------------------------------------------------------------------- LDAP


def read_ldap(url: str, base: str, timeout: float, max_entries: int = index_ldif.MAX_ENTRIES,
              ) -> list[tuple[str, dict[str, list[bytes]]]]:
    """Every ``provider`` entry under ``base`` on the server at ``url`` (blocking, anonymous)."""
    with warnings.catch_warnings():
        # ldap3 2.9.1 reads pyasn1's old names (tagMap, typeMap), which pyasn1 >= 0.6.1 flags
        warnings.simplefilter("ignore", DeprecationWarning)
        import ldap3  # imported here: only the LDAP read needs it
        from ldap3.core.exceptions import LDAPException

    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise IndexRefused(f"{url!r} is not an ldap:// or ldaps:// URL")
    try:
        server = ldap3.Server(parts.hostname, port=parts.port or (636 if scheme == "ldaps" else 389),
                              use_ssl=scheme == "ldaps", connect_timeout=timeout, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, auto_bind=ldap3.AUTO_BIND_NO_TLS, read_only=True,
                                receive_timeout=max(1, int(timeout)), raise_exceptions=False)
        try:
            ok = conn.search(base, "(objectClass=provider)", search_scope=ldap3.SUBTREE,
                             attributes=list(LDAP_ATTRIBUTES), size_limit=max_entries + 1,
                             time_limit=int(timeout))
            if not ok and conn.result.get("result") not in (0, 4):  # 4: sizeLimitExceeded
                raise IndexRefused(f"LDAP search under {base!r} at {url}: "
                                   f"{conn.result.get('description')} {conn.result.get('message')}")
            entries = [(str(e["dn"]), {k: [bytes(v) for v in vals]
                                       for k, vals in e["raw_attributes"].items()})
                       for e in conn.response or [] if e.get("type") == "searchResEntry"]
        finally:
            conn.unbind()
    except (LDAPException, OSError, ValueError, TypeError) as exc:  # a client library on the wire
        raise IndexRefused(f"LDAP server {url}: {exc or type(exc).__name__}") from None
    if len(entries) > max_entries:
        raise IndexRefused(f"LDAP server {url} lists more than {max_entries} providers")
    return entries


def read_directory(url: str, base: str, timeout: float) -> IndexCopy:
    providers, skipped = index_ldif.providers_from_entries(read_ldap(url, base, timeout))
    if not providers:
        raise IndexRefused(f"no usable provider entry under {base!r} at {url}"
                           + (f" ({'; '.join(skipped[:3])})" if skipped else ""))
    return IndexCopy(source=f"{url} {base}", kind="ldap", raw=b"", providers=tuple(providers),
                     skipped=tuple(skipped))


# --------------------------------------------------------------------------- one refresh


def obtain(source: IndexSource, clock: Clock, url: str | None = None, base: str | None = None,
           authority: list[x509.Certificate] | None = None) -> IndexCopy:
    """A checked copy from ``url`` (default: the configured one), blocking; IndexRefused if not."""
    url = url or source.url
    if not url:
        raise IndexRefused("no index source: set [index] url")
    if url.split(":", 1)[0].lower() in ("ldap", "ldaps"):
        return read_directory(url, base or source.base, source.timeout)
    certs = authority if authority is not None else authority_certs(source)
    data = fetch_url(url, source.max_size, source.timeout)
    return index_ldif.read_signed(data, url, certs, clock.now(), source.max_size)


@dataclass(frozen=True)
class RefreshResult:
    ok: bool
    message: str
    copy: IndexCopy | None = None


class IndexRefresher:
    """``pecd serve``'s refresh task: every ``refresh_interval`` (``retry_interval`` after a
    failure), fetch, check, and either replace the copy and reload the live view, or keep it."""

    def __init__(self, config: Config, db: Database, clock: Clock,
                 view: index.ProviderIndex) -> None:
        self.config = config
        self.db = db
        self.clock = clock
        self.view = view

    async def refresh_once(self) -> RefreshResult:
        source = self.config.index
        where = source.url or ""
        loop = asyncio.get_running_loop()
        begun = self.clock.now()
        try:
            copy = await loop.run_in_executor(None, obtain, source, self.clock)
        except IndexRefused as exc:
            return await self._refused(where, str(exc))
        except Exception as exc:  # a refresh never takes the service down
            log.exception("index refresh from %s failed unexpectedly", where)
            return await self._refused(where, f"unexpected error: {type(exc).__name__}: {exc}")
        at = self.clock.now()

        def save(conn: Connection) -> tuple[list[index.Provider], bool]:
            # several nodes refresh on the same schedule: the first to commit this copy takes
            # it (one index-updated row); one that fetched the same copy meanwhile only reloads
            ledger.serialize_with_appends(conn)
            if _taken_since(index.copy_info(conn), copy.sha256, begun):
                return index.load_all(conn), False
            index.take_copy(conn, copy, where, at)
            return index.load_all(conn), True

        try:
            providers, taken = await self.db.transact(save)
        except index.IndexError_ as exc:  # an older copy than the one in force
            return await self._refused(where, str(exc))
        self.view.replace(providers)
        if not taken:
            return RefreshResult(True, f"same copy already taken by another node from {where}", copy)
        log.info("index copy replaced from %s: %d providers%s", where, len(copy.providers),
                 f", {len(copy.skipped)} entries left out" if copy.skipped else "")
        for why in copy.skipped:
            log.warning("index entry left out: %s", why)
        return RefreshResult(True, f"{len(copy.providers)} providers from {where}", copy)

    async def _refused(self, where: str, reason: str) -> RefreshResult:
        at = self.clock.now()

        info = await self.db.transact(lambda conn: index.refuse_copy(conn, where, at, reason))
        log.error("index refresh from %s refused: %s; %s", where, reason,
                  f"keeping the copy of {info.fetched}" if info else "no copy in force")
        return RefreshResult(False, reason)

    async def _fresh_for(self) -> float:
        """Seconds until the copy in force (whichever node took it) is due for a refresh."""
        info = await self.db.transact(index.copy_info)
        if info is None or info.source.split(" ")[0] != self.config.index.url:
            return 0.0
        age = (self.clock.now() - datetime.fromisoformat(info.fetched)).total_seconds()
        return self.config.index.refresh_interval - age if age >= 0 else 0.0

    async def run(self) -> None:
        """Refresh now, then on schedule; never ends by itself (cancelled at stop)."""
        source = self.config.index
        while True:
            try:
                wait = await self._fresh_for()
                if wait > 0:  # a restart, or another node refreshed meanwhile: due later
                    await asyncio.sleep(wait)
                    continue
                result = await self.refresh_once()
                delay = source.refresh_interval if result.ok else source.retry_interval
            except Exception:  # the database itself failed: log, retry later
                log.exception("index refresh failed")
                delay = source.retry_interval
            await asyncio.sleep(max(delay, 1.0))


def _taken_since(info: index.CopyInfo | None, sha256: str, since: datetime) -> bool:
    """Whether the copy in force is this same copy, taken after ``since`` (by another node)."""
    return (info is not None and info.sha256 == sha256
            and datetime.fromisoformat(info.fetched) >= since)
