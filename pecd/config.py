"""Provider configuration, read from one TOML file.

Every path in the file is relative to the file's own directory, so a provider directory made by
``pecd init`` can be moved as a whole. Defaults are the embedded ones: SQLite, Maildir, built-in
TSA, loopback ports.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pecd.trust import AlgorithmPolicy


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
    auth_failures_per_account: int = 5  # within auth_window: then 454 until the window lets go
    auth_failures_per_address: int = 20
    auth_window: float = 900.0
    lock_after_failures: int = 20  # consecutive failures lock the account until `pecd user enable`


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
class Delivery:
    method: Literal["maildir", "lmtp"] = "maildir"
    lmtp_host: str = "127.0.0.1"
    lmtp_port: int = 24


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

    @property
    def database(self) -> Path:
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
    relay: Relay = field(default_factory=Relay)
    timeouts: Timeouts = field(default_factory=Timeouts)
    delivery: Delivery = field(default_factory=Delivery)
    ledger: LedgerPolicy = field(default_factory=LedgerPolicy)
    antivirus: Antivirus = field(default_factory=Antivirus)
    trust: Trust = field(default_factory=Trust)
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
    )
    tsa = _section(raw, "tsa")
    http = _http(_section(raw, "http"), base)
    delivery = _section(raw, "delivery")
    return Config(
        name=name,
        domains=domains,
        service_address=str(provider.get("service_address", f"posta-certificata@{domains[0]}")),
        hostname=str(provider.get("hostname", "localhost")),
        paths=paths,
        listen=_build(Listen, _section(raw, "listen"), "listen"),
        limits=_build(Limits, _section(raw, "limits"), "limits"),
        relay=_build(Relay, _section(raw, "relay"), "relay"),
        timeouts=_build(Timeouts, _section(raw, "timeouts"), "timeouts"),
        delivery=_build(Delivery, delivery, "delivery"),
        ledger=_build(LedgerPolicy, _section(raw, "ledger"), "ledger"),
        antivirus=_build(Antivirus, _section(raw, "antivirus"), "antivirus"),
        trust=_trust(_section(raw, "trust")),
        http=http,
        tsa_url=str(tsa["url"]) if tsa.get("url") else None,
        workers=int(raw.get("workers", 4)),
    )


def render(
    *,
    name: str,
    domain: str,
    data_dir: str,
    listen: Listen,
    ca_certs: str,
    http_port: int = 10080,
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
max_connections_per_address = 20       # concurrent SMTP connections from one client address
max_commands_per_session = 1000        # then 421 and the connection closes
auth_failures_per_account = 5          # failed logins per account within auth_window: then 454 ...
auth_failures_per_address = 20         # ... and per client address
auth_window = 900.0                    # seconds
lock_after_failures = 20               # consecutive failed logins lock an account until `pecd user enable`

[relay]
retry_base = 30.0                      # seconds before the first retry; doubles, with jitter
retry_max = 3600.0
max_attempts = 30
# smarthost = "127.0.0.1"              # where mail for non-PEC (esterno) recipients goes
# smarthost_port = 25
tls_verify = true

[timeouts]
warning_after = 43200.0                # 12 h: notice when neither take-charge nor delivery came
give_up_after = 86400.0                # 24 h: the transaction ends negative

[delivery]
method = "maildir"                     # or "lmtp" (e.g. to Dovecot)
# lmtp_host = "127.0.0.1"
# lmtp_port = 24

[ledger]
checkpoint_rows = 1000                 # timestamp the hash-chain head every N rows ...
checkpoint_interval = 300.0            # ... or every T seconds, whichever comes first

[antivirus]
# clamd = "unix:/run/clamav/clamd.ctl" # or "tcp:127.0.0.1:3310"; no virus scanning when unset

[trust]
digests = ["sha1", "sha224", "sha256", "sha384", "sha512"]   # accepted in peers' signatures and
                                       # their chains; SHA-1 (all real PEC providers) is marked weak

[tsa]
# url = "http://tsa.example/tsr"       # external RFC 3161 TSA; the built-in one when unset
'''
