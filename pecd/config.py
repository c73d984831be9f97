"""Provider configuration, read from one TOML file.

Every path in the file is relative to the file's own directory, so a provider directory made by
``pecd init`` can be moved as a whole. Defaults are the embedded ones: SQLite, Maildir, built-in
TSA, loopback ports.
"""

from __future__ import annotations

import json
import re
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pecd.trust.paths import AlgorithmPolicy


class ConfigError(Exception):
    """The configuration file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    submission_port: int = 10587
    smtps_port: int = 10465
    inbound_port: int = 10025


@dataclass(frozen=True)
class Http:
    """The HTTP API listener (``[http]``); none when the section names no port. Plain HTTP only on
    loopback: anywhere else it needs ``tls_cert`` and ``tls_key`` (tokens and passwords travel in
    it). ``answer_wait``: how long ``POST /api/v1/messages`` waits for the access point's verdict
    before it answers ``202`` with the queue id only."""

    host: str = "127.0.0.1"
    port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    answer_wait: float = 30.0
    webhook_retry_base: float = 10.0  # seconds before a failed webhook delivery is retried; doubles
    webhook_retry_max: float = 3600.0
    webhook_max_attempts: int = 20  # then the delivery is marked failed (and a ledger row says so)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the SMTP listeners (see SECURITY.md)."""

    max_message_size: int = 30_000_000
    max_recipients: int = 50
    session_timeout: float = 300.0  # idle seconds per command; a whole DATA transfer counts as one
    max_header_fields: int = 500
    max_header_bytes: int = 512 * 1024
    max_connections_per_address: int = 20
    max_commands_per_session: int = 1000
    # failed logins within auth_window (see pecd.throttle.AuthThrottle and SECURITY.md):
    auth_failures_per_source: int = 5  # per (account, client address): then 454 for that pair
    auth_failures_per_address: int = 20  # per client address over all accounts: then 454
    auth_failures_per_account: int = 10  # per account over all addresses: then it is slowed
    auth_window: float = 900.0
    auth_slow_interval: float = 10.0  # a slowed account's password checks, this far apart
    auth_slow_max_wait: float = 60.0  # an attempt that would wait longer gets 454 for now
    tls_failures_per_address: int = 50  # failed TLS handshakes within auth_window: then 421
    lock_after_failures: int = 0  # >0: consecutive failures lock the account until `pecd user
    # enable` (off by default: anyone who knows an address could lock its owner out)


TLS12_AEAD = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


@dataclass(frozen=True)
class Tls:
    """What the listeners offer over TLS 1.2 (an OpenSSL cipher string; TLS 1.3 suites are all
    AEAD and not affected). The default is ECDHE with AES-GCM or ChaCha20-Poly1305 only: no CBC
    suite, whose MAC-then-encrypt padding checks are the Lucky13/POODLE family's door. An
    operator with old clients may widen it, e.g. ``"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES"``."""

    tls12_ciphers: str = TLS12_AEAD

    def __post_init__(self) -> None:
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.set_ciphers(self.tls12_ciphers)
        except ssl.SSLError:
            raise ConfigError(f"[tls] tls12_ciphers selects no cipher: {self.tls12_ciphers!r}") from None


@dataclass(frozen=True)
class Relay:
    """Outbound SMTP: retries and where mail for non-PEC (``esterno``) domains goes."""

    retry_base: float = 30.0
    retry_max: float = 3600.0
    max_attempts: int = 30
    smarthost: str | None = None
    smarthost_port: int = 25
    tls_verify: bool = True
    connect_timeout: float = 30.0


TlsPolicy = Literal["indexed", "all", "off"]
TLS_POLICIES: tuple[TlsPolicy, ...] = ("indexed", "all", "off")


@dataclass(frozen=True)
class Inbound:
    """What the inbound listener asks of peers (see SECURITY.md).

    ``require_tls``: ``indexed`` (default) takes an envelope or receipt signed by a provider in
    the index as certified only if it arrived over STARTTLS, the way pecd's own relay sends it;
    one that came in clear reaches its recipients inside an anomaly envelope. Ordinary mail may
    still come in clear (RFC 6109 §5). ``all`` refuses every plaintext transaction at ``MAIL``
    (``530``), ordinary mail included: a closed network's choice, not the RFC's. ``off`` asks
    nothing of the transport.
    """

    require_tls: TlsPolicy = "indexed"

    def __post_init__(self) -> None:
        if self.require_tls not in TLS_POLICIES:
            raise TypeError(f"require_tls must be one of {', '.join(TLS_POLICIES)},"
                            f" not {self.require_tls!r}")


@dataclass(frozen=True)
class Timeouts:
    warning_after: float = 12 * 3600.0
    give_up_after: float = 24 * 3600.0


@dataclass(frozen=True)
class Antivirus:
    """clamd's socket, ``unix:/path`` or ``tcp:host:port``; scanning is off when unset."""

    clamd: str | None = None


@dataclass(frozen=True)
class LedgerPolicy:
    """A checkpoint (chain head + RFC 3161 token) every ``checkpoint_rows`` rows or
    ``checkpoint_interval`` seconds, whichever comes first."""

    checkpoint_rows: int = 1000
    checkpoint_interval: float = 300.0


@dataclass(frozen=True)
class Trust:
    """What a peer's signature may use. ``digests`` is the allow-list for signatures and for the
    certificates of their paths; the default takes SHA-1 because every real PEC provider still
    signs with it (it is then marked weak in verdicts and ledger rows)."""

    digests: tuple[str, ...] = ("sha1", "sha224", "sha256", "sha384", "sha512")

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "policy", AlgorithmPolicy.from_names(self.digests))
        except ValueError as exc:
            raise ConfigError(f"[trust] digests: {exc}") from None

    policy: AlgorithmPolicy = field(init=False, repr=False, compare=False)


@dataclass(frozen=True)
class IndexSource:
    """The index authority's directory: where to refresh it from and whose signature it needs.

    ``url``: ``http(s)://`` for a signed LDIF file, ``ldap(s)://host:port`` for a live directory
    (entries under ``base``). No refresh when unset. A refresh that fails keeps the last good copy.
    """

    authority_cert: Path | None = None
    url: str | None = None
    base: str = "o=postacert"
    refresh_interval: float = 86400.0
    retry_interval: float = 900.0  # after a failed refresh
    max_size: int = 16 * 1024 * 1024
    timeout: float = 60.0


@dataclass(frozen=True)
class Delivery:
    method: Literal["maildir", "lmtp"] = "maildir"
    lmtp_host: str = "127.0.0.1"
    lmtp_port: int = 24
    quota: int | None = None  # bytes per Maildir (pecd.points.delivery); None: no quota


@dataclass(frozen=True)
class Consultation:
    """Reading evidence (presa visione, see pecd.points.reading): ``enabled`` says this provider issues
    it (and its card declares so); ``default`` whether a sender who says nothing asks for it;
    ``deadline`` (seconds) after which an unread message gets the not-read evidence."""

    enabled: bool = False
    deadline: float = 7 * 86400.0
    default: bool = False


def parse_duration(value: object, where: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
        if match is None:
            raise ConfigError(f"{where}: not a duration (use s, m, h or d): {value!r}")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[
            match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{where}: must be positive")
    return seconds


def parse_size(value: object, where: str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64KB"`` (powers of 1024; ``K``/``M``/``G`` alone too) or bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: not a size: {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(value).lower())
        if match is None:
            raise ConfigError(f"{where}: not a size (e.g. 500MB, 1GB): {value!r}")
        size = int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))
    if size <= 0:
        raise ConfigError(f"{where}: must be positive")
    return size


def _fallback(values: dict[str, Any], base: Path) -> Fallback:
    values = dict(values)
    for key in ("webhook_secret_file", "print_dir"):
        if values.get(key):
            values[key] = (base / str(values[key])).resolve()
    url = values.get("webhook")
    if url and not str(url).startswith(("http://", "https://")):
        raise ConfigError("[fallback] webhook must be an http or https URL")
    if url and not values.get("webhook_secret_file"):
        raise ConfigError("[fallback] webhook needs webhook_secret_file (the HMAC key)")
    return _build(Fallback, values, "fallback")  # type: ignore[no-any-return]


def _consultation(values: dict[str, Any]) -> Consultation:
    values = dict(values)
    if "deadline" in values:
        values["deadline"] = parse_duration(values["deadline"], "[consultation] deadline")
    for key in ("enabled", "default"):
        if key in values and not isinstance(values[key], bool):
            raise ConfigError(f"[consultation] {key} must be true or false")
    return _build(Consultation, values, "consultation")  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Fallback:
    """What runs when a message is not read by its deadline (pecd.points.fallback); all optional."""

    webhook: str | None = None  # http(s) URL: POST of a JSON event, HMAC-SHA256 signed
    webhook_secret_file: Path | None = None
    command: str | None = None  # run by /bin/sh with the JSON event on stdin
    print_dir: Path | None = None  # outbox for print-and-post PDFs
    timeout: float = 30.0  # seconds per webhook call or command

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(name for name, on in (("webhook", self.webhook), ("command", self.command),
                                           ("print", self.print_dir)) if on)


@dataclass(frozen=True)
class Reception:
    """Revocation of peers' signing certificates (RFC 6109 §2.2.2, §7; see pecd.trust.revocation).

    ``revocation``: what happens while a signer's status cannot be learnt (its CRL and OCSP
    sources down): ``"defer"`` answers ``451`` so the peer retries, and after
    ``revocation_grace`` seconds of unknown status the message is accepted and becomes an
    anomaly envelope; ``"anomaly"`` makes it an anomaly envelope at once. Never accepted as
    certified. ``"off"`` checks no revocation at all (an explicit choice for closed test
    networks and offline replays of old mail; the service logs a warning at start)."""

    revocation: Literal["defer", "anomaly", "off"] = "defer"
    revocation_grace: float = 4 * 3600.0
    revocation_timeout: float = 10.0  # seconds per CRL or OCSP fetch
    revocation_retry: float = 60.0  # seconds before a source that failed is asked again
    max_crl_bytes: int = 20_000_000


@dataclass(frozen=True)
class Paths:
    data_dir: Path
    signing_key: Path
    signing_cert: Path
    tls_key: Path
    tls_cert: Path
    tsa_key: Path
    tsa_cert: Path
    ca_certs: Path
    # [database] url: a ``postgresql://`` URL; None keeps the SQLite file in data_dir
    database_url: str | None = None

    @property
    def database(self) -> Path | str:
        """Where the provider's state lives: the PostgreSQL URL if configured, else the SQLite
        file (pecd.store.db.connect takes either)."""
        return self.database_url or self.sqlite_file

    @property
    def sqlite_file(self) -> Path:
        return self.data_dir / "pecd.sqlite"

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    @property
    def mail(self) -> Path:
        return self.data_dir / "mail"


@dataclass(frozen=True)
class Config:
    name: str
    domains: tuple[str, ...]
    service_address: str
    hostname: str
    paths: Paths
    listen: Listen = field(default_factory=Listen)
    limits: Limits = field(default_factory=Limits)
    tls: Tls = field(default_factory=Tls)
    relay: Relay = field(default_factory=Relay)
    inbound: Inbound = field(default_factory=Inbound)
    timeouts: Timeouts = field(default_factory=Timeouts)
    delivery: Delivery = field(default_factory=Delivery)
    ledger: LedgerPolicy = field(default_factory=LedgerPolicy)
    antivirus: Antivirus = field(default_factory=Antivirus)
    reception: Reception = field(default_factory=Reception)
    index: IndexSource = field(default_factory=IndexSource)
    trust: Trust = field(default_factory=Trust)
    consultation: Consultation = field(default_factory=Consultation)
    fallback: Fallback = field(default_factory=Fallback)
    http: Http = field(default_factory=Http)
    tsa_url: str | None = None
    workers: int = 4

    @property
    def domain(self) -> str:
        return self.domains[0]

    def is_local(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.domains


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _build(cls: type[Any], values: dict[str, Any], where: str) -> Any:
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


def _trust(values: dict[str, Any]) -> Trust:
    if "digests" in values:
        if not isinstance(values["digests"], list):
            raise ConfigError("[trust] digests must be a list of names")
        values = {**values, "digests": tuple(str(d) for d in values["digests"])}
    return _build(Trust, values, "trust")  # type: ignore[no-any-return]


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _http(values: dict[str, Any], base: Path) -> Http:
    values = dict(values)
    for key in ("tls_cert", "tls_key"):
        if values.get(key):
            values[key] = (base / str(values[key])).resolve()
    http: Http = _build(Http, values, "http")
    if (http.tls_cert is None) != (http.tls_key is None):
        raise ConfigError("[http] needs both tls_cert and tls_key, or neither")
    if http.port is not None and not http.tls and not (
            http.host in _LOOPBACK or http.host.startswith("127.")):
        raise ConfigError("[http] listens beyond loopback without TLS: set tls_cert and tls_key")
    return http


def _database_url(values: dict[str, Any]) -> str | None:
    unknown = set(values) - {"url"}
    if unknown:
        raise ConfigError(f"[database] has unknown keys: {', '.join(sorted(unknown))}")
    url = values.get("url")
    if url is None or url == "":
        return None
    if not isinstance(url, str) or url.split(":", 1)[0].lower() not in ("postgresql", "postgres"):
        raise ConfigError("[database] url must be a postgresql:// URL (absent: SQLite in data_dir)")
    return url


def load(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no configuration file at {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent
    provider = _section(raw, "provider")
    try:
        name = str(provider["name"])
        domains = tuple(str(d).lower() for d in provider["domains"])
    except KeyError as exc:
        raise ConfigError(f"[provider] needs {exc.args[0]}") from None
    if not domains:
        raise ConfigError("[provider] domains must name at least one domain")
    files = _section(raw, "files")

    def resolve(key: str, default: str) -> Path:
        return (base / str(files.get(key, default))).resolve()

    paths = Paths(
        data_dir=resolve("data_dir", "data"),
        signing_key=resolve("signing_key", "keys/signing.key"),
        signing_cert=resolve("signing_cert", "keys/signing.pem"),
        tls_key=resolve("tls_key", "keys/tls.key"),
        tls_cert=resolve("tls_cert", "keys/tls.pem"),
        tsa_key=resolve("tsa_key", "keys/tsa.key"),
        tsa_cert=resolve("tsa_cert", "keys/tsa.pem"),
        ca_certs=resolve("ca_certs", "keys/ca.pem"),
        database_url=_database_url(_section(raw, "database")),
    )
    tsa = _section(raw, "tsa")
    http = _http(_section(raw, "http"), base)
    delivery = _section(raw, "delivery")
    if "quota" in delivery:
        delivery = {**delivery, "quota": parse_size(delivery["quota"], "[delivery] quota")}
    reception: Reception = _build(Reception, _section(raw, "reception"), "reception")
    if reception.revocation not in ("defer", "anomaly", "off"):
        raise ConfigError(f"[reception] revocation must be \"defer\", \"anomaly\" or \"off\","
                          f" not {reception.revocation!r}")
    index = dict(_section(raw, "index"))
    if index.get("authority_cert"):
        index["authority_cert"] = (base / str(index["authority_cert"])).resolve()
    index_source: IndexSource = _build(IndexSource, index, "index")
    if index_source.url and index_source.url.split(":", 1)[0].lower() not in (
            "http", "https", "ldap", "ldaps"):
        raise ConfigError("[index] url must be http(s):// (signed LDIF) or ldap(s):// (directory)")
    return Config(
        name=name,
        domains=domains,
        service_address=str(provider.get("service_address", f"posta-certificata@{domains[0]}")),
        hostname=str(provider.get("hostname", "localhost")),
        paths=paths,
        listen=_build(Listen, _section(raw, "listen"), "listen"),
        limits=_build(Limits, _section(raw, "limits"), "limits"),
        tls=_build(Tls, _section(raw, "tls"), "tls"),
        relay=_build(Relay, _section(raw, "relay"), "relay"),
        inbound=_build(Inbound, _section(raw, "inbound"), "inbound"),
        timeouts=_build(Timeouts, _section(raw, "timeouts"), "timeouts"),
        delivery=_build(Delivery, delivery, "delivery"),
        ledger=_build(LedgerPolicy, _section(raw, "ledger"), "ledger"),
        antivirus=_build(Antivirus, _section(raw, "antivirus"), "antivirus"),
        reception=reception,
        index=index_source,
        trust=_trust(_section(raw, "trust")),
        consultation=_consultation(_section(raw, "consultation")),
        fallback=_fallback(_section(raw, "fallback"), base),
        http=http,
        tsa_url=str(tsa["url"]) if tsa.get("url") else None,
        workers=int(raw.get("workers", 4)),
    )


def _database_line(url: str | None) -> str:
    if url is None:
        return ('# url = "postgresql://pecd@db.example/pecd"   # PostgreSQL instead of the SQLite'
                ' file in data_dir')
    return f"url = {json.dumps(url)}   # PostgreSQL: queue, bodies, ledger, accounts"


def use_database(conf_path: Path, url: str | None) -> None:
    """Point an existing provider's configuration at ``url`` (None: back to the SQLite file):
    the ``[database]`` table is rewritten, nothing else. The schema is made on first open
    (``pecd.store.db.open_database``); moving the data is ``pecd db copy``'s job."""
    text = conf_path.read_text()
    line = _database_line(url)
    pattern = re.compile(r"^\[database\]\n(?:(?!\[)[^\n]*\n?)*", re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _m: f"[database]\n{line}\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n[database]\n{line}\n"
    conf_path.write_text(text)
    load(conf_path)  # still a valid configuration


def render(
    *,
    name: str,
    domain: str,
    data_dir: str,
    listen: Listen,
    ca_certs: str,
    http_port: int = 10080,
    database_url: str | None = None,
) -> str:
    """The commented configuration ``pecd init`` writes."""
    return f'''# pecd provider configuration. Paths are relative to this file.

[provider]
name = "{name}"                        # appears in certificates and as gestore-emittente
domains = ["{domain}"]                 # mail domains this provider manages
service_address = "posta-certificata@{domain}"   # From of every receipt; take-charge receipts land here
hostname = "localhost"                 # name announced in SMTP greetings

[files]
data_dir = "{data_dir}"                # SQLite database, spool, Maildirs (mail/<domain>/<user>/)
signing_key = "keys/signing.key"       # provider signing key (0600)
signing_cert = "keys/signing.pem"      # provider signing certificate
tls_key = "keys/tls.key"               # SMTP listeners' TLS key
tls_cert = "keys/tls.pem"
tsa_key = "keys/tsa.key"               # built-in RFC 3161 TSA
tsa_cert = "keys/tsa.pem"
ca_certs = "{ca_certs}"                # CA(s) trusted for peers' TLS and signatures

[database]
{_database_line(database_url)}

[listen]
host = "{listen.host}"
submission_port = {listen.submission_port}   # STARTTLS + AUTH for mail clients
smtps_port = {listen.smtps_port}              # implicit TLS + AUTH for mail clients
inbound_port = {listen.inbound_port}          # other providers (and the Internet) deliver here

[http]
host = "127.0.0.1"                     # HTTP API (send, track, verify), /metrics, /healthz, /readyz
port = {http_port}                           # remove the port to run without the HTTP listener
# tls_cert = "keys/tls.pem"            # TLS like the SMTP listeners; required beyond loopback
# tls_key = "keys/tls.key"
answer_wait = 30.0                     # seconds POST /api/v1/messages waits for the access point

[limits]
max_message_size = 30000000            # bytes, times the number of recipients (RFC 6109 legal limit: 30 MB)
max_recipients = 50
session_timeout = 300.0                # idle seconds allowed per command (a whole DATA transfer is one)
max_header_fields = 500                # header fields per message
max_header_bytes = 524288              # size of the header section
max_connections_per_address = 20       # concurrent connections from one client address (SMTP; HTTP apart)
max_commands_per_session = 1000        # then 421 and the connection closes
auth_failures_per_source = 5           # failed logins per (account, client address) in auth_window: 454
auth_failures_per_address = 20         # ... per client address, over all accounts: then 454
auth_failures_per_account = 10         # ... per account, over all addresses: then it is slowed, never locked:
auth_slow_interval = 10.0              #     one password check per this many seconds, whoever asks;
auth_slow_max_wait = 60.0              #     an attempt that would wait longer gets 454 for now
auth_window = 900.0                    # seconds
tls_failures_per_address = 50          # failed TLS handshakes within auth_window: then 421 at connect
lock_after_failures = 0                # N > 0: N failures in a row lock the account until `pecd user enable`
                                       # (off: a lock lets anyone who knows an address lock its owner out)

[tls]
# TLS 1.2 suites every listener offers (OpenSSL syntax; TLS 1.3 is AEAD anyway): AEAD only.
# Old CBC-only clients: append ":ECDHE+AES".
tls12_ciphers = "{TLS12_AEAD}"

[relay]
retry_base = 30.0                      # seconds before the first retry; doubles, with jitter
retry_max = 3600.0
max_attempts = 30
# smarthost = "127.0.0.1"              # where mail for non-PEC (esterno) recipients goes
# smarthost_port = 25
tls_verify = true

[inbound]
require_tls = "indexed"                # certified mail from indexed providers only over STARTTLS;
                                       # "all": no plaintext transaction at all; "off": no check

[timeouts]
warning_after = 43200.0                # 12 h: notice when neither take-charge nor delivery came
give_up_after = 86400.0                # 24 h: the transaction ends negative

[delivery]
method = "maildir"                     # or "lmtp" (e.g. to Dovecot)
# quota = "1GB"                        # per Maildir (users: pecd user set ADDR --quota SIZE)
# lmtp_host = "127.0.0.1"
# lmtp_port = 24

# reading evidence, beyond RFC 6109 (docs/reading.md)
[consultation]
enabled = false                        # issue presa visione / mancata presa visione (the card says so)
deadline = "7d"                        # not opened by then: proof of not reading (s, m, h, d)
default = false                        # whether a sender who says nothing asks for it

[ledger]
checkpoint_rows = 1000                 # timestamp the hash-chain head every N rows ...
checkpoint_interval = 300.0            # ... or every T seconds, whichever comes first

[antivirus]
# clamd = "unix:/run/clamav/clamd.ctl" # or "tcp:127.0.0.1:3310"; no virus scanning when unset

[reception]
# peers' signing certificates are checked against their CRL / OCSP responder when they name one
revocation = "defer"                   # status unknown (sources down): 451, the peer retries ...
revocation_grace = 14400.0             # ... this many seconds, then anomaly envelope ("anomaly": at once;
                                       # "off": no revocation check, for closed test networks only)
revocation_timeout = 10.0              # seconds per CRL or OCSP fetch
revocation_retry = 60.0                # seconds before asking a failed source again
max_crl_bytes = 20000000               # a bigger CRL is refused (the copy in force stays)

[trust]
digests = ["sha1", "sha224", "sha256", "sha384", "sha512"]   # accepted in peers' signatures and
                                       # their chains; SHA-1 (all real PEC providers) is marked weak

[tsa]
# url = "http://tsa.example/tsr"       # external RFC 3161 TSA; the built-in one when unset

[index]
# authority_cert = "keys/index-authority.pem"  # signed LDIF must verify under this certificate
# url = "https://index.example/providers.ldif.p7m"  # signed LDIF; or "ldap://host:389" (then base applies)
# base = "o=postacert"                 # LDAP search base for the provider entries
# refresh_interval = 86400.0           # seconds between refreshes; the last good copy stays when one fails
# retry_interval = 900.0               # seconds before retrying a failed refresh
# max_size = 16777216                  # bytes: a bigger index file is refused
'''
