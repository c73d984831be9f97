"""The operator's command line: a thin click layer over the library. Domain errors become one-line
messages and a non-zero exit; nothing here holds logic another caller would need.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from pecd import config as config_mod
from pecd.clock import SystemClock
from pecd.config import Config, ConfigError, Listen
from pecd.store import Connection, Unavailable, Where, apistore, durable, ledger, readings, users
from pecd.store import db as db_mod
from pecd.store import queue as queue_mod
from pecd.trust import index as index_mod
from pecd.trust import index_ldif, index_sync, pki
from pecd.trust import paths as trust_mod
from pecd.trust.cms import SignatureInvalid
from pecd.trust.verdict import Verdict, describe


class Context:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = config_mod.load(self.config_path)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
        return self._config

    def connect(self) -> Connection:
        return open_or_fail(self.config.paths.database)

    def write(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(conn, *args)`` in one write transaction; its exceptions pass through."""
        conn = self.connect()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                return fn(conn, *args)
        finally:
            conn.close()

    def transact(self, fn: Any, *args: Any) -> Any:
        """:meth:`write`, with domain errors turned into one line."""
        try:
            return self.write(fn, *args)
        except (users.UserError, queue_mod.QueueError, index_mod.IndexError_) as exc:
            raise click.ClickException(str(exc)) from None


def open_or_fail(where: Where) -> Connection:
    """The database, schema brought up to date; an unreachable PostgreSQL is one clear line
    and a non-zero exit, not a traceback."""
    try:
        return db_mod.open_database(where)
    except Unavailable as exc:
        raise click.ClickException(f"database unreachable: {exc}") from None


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path),
              default=lambda: os.environ.get("PECD_CONFIG", "pecd.toml"), show_default="pecd.toml",
              help="Provider configuration file (or $PECD_CONFIG).")
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
@click.pass_context
def main(ctx: click.Context, config_path: Path, verbose: bool) -> None:
    """pecd: certified mail (PEC, RFC 6109) gateway."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.WARNING)
    # aiosmtpd warns about its own use of a deprecated attribute on every login
    aiosmtpd_log.addFilter(lambda record: "login_data is deprecated" not in record.getMessage())
    ctx.obj = Context(config_path)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--domain", required=True, help="Mail domain this provider manages.")
@click.option("--name", default=None, help="Provider name (default: 'PEC <domain>').")
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), default=None,
              help="Dev CA directory, created when missing; share it between local providers.")
@click.option("--data-dir", default="data", show_default=True, help="Data directory (relative to DIRECTORY).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option("--submission-port", default=10587, show_default=True, type=int)
@click.option("--smtps-port", default=10465, show_default=True, type=int)
@click.option("--inbound-port", default=10025, show_default=True, type=int)
@click.option("--http-port", default=10080, show_default=True, type=int,
              help="HTTP API port (plain HTTP: only on a loopback --host).")
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Signing key issued by an outside CA (PEM; with --cert).")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Signing certificate from that CA (PEM; with --key).")
@click.option("--chain", "chain_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="The CA's intermediates (and root) for --cert (PEM bundle).")
@click.option("--key-uri", default=None, metavar="URI",
              help='Signing key in a PKCS#11 token ("pkcs11:token=T;object=O"): found there, or'
                   " generated there (sensitive, not extractable); with --pkcs11-module, --pin-file.")
@click.option("--pkcs11-module", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="PKCS#11 module for --key-uri.")
@click.option("--pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="File with the token's user PIN, for --key-uri.")
@click.option("--database-url", default=None, metavar="URL",
              help="Keep the provider's state in this PostgreSQL database (postgresql://...; "
                   "created schema and all) instead of a SQLite file in the data directory.")
def init(directory: Path, domain: str, name: str | None, ca_dir: Path | None, data_dir: str,
         host: str, submission_port: int, smtps_port: int, inbound_port: int,
         http_port: int, key_type: str, key_file: Path | None, cert_file: Path | None,
         chain_file: Path | None, key_uri: str | None, pkcs11_module: Path | None,
         pin_file: Path | None, database_url: str | None) -> None:
    """Create a provider: config, keys and certificates from a dev CA, database.

    With --key and --cert the signing pair comes from an outside CA instead (the dev CA
    still issues the TLS and TSA certificates): checked, then copied into keys/."""
    domain = domain.lower()
    name = name or f"PEC {domain}"
    conf_path = directory / "pecd.toml"
    if conf_path.exists():
        raise click.ClickException(f"{conf_path} exists; refusing to overwrite")
    if (key_file is None) != (cert_file is None) or (chain_file and not cert_file):
        raise click.ClickException("--key and --cert go together (--chain needs them)")
    if key_uri is not None and (pkcs11_module is None or pin_file is None or key_file):
        raise click.ClickException("--key-uri needs --pkcs11-module and --pin-file (and no --key)")
    service_address = f"posta-certificata@{domain}"
    outside = None
    if key_file is not None and cert_file is not None:
        try:
            outside = pki.check_outside_pair(key_file, cert_file, chain_file, service_address,
                                             name, datetime.now(UTC))
        except pki.PKIError as exc:
            raise click.ClickException(str(exc)) from None
        for warning in outside.warnings:
            click.echo(f"warning: {warning}", err=True)
    keys = directory / "keys"
    durable.private_dir(keys)  # and DIRECTORY itself, when init makes it
    ca_dir = ca_dir or directory / "ca"
    ca = pki.CertAuthority.load_or_create(ca_dir)
    kind: Any = key_type
    if outside is not None:
        pki.install_outside_pair(outside, keys / "signing.key", keys / "signing.pem")
    elif key_uri is not None and pkcs11_module is not None and pin_file is not None:
        from pecd.trust import keys as token_keys

        options = token_keys.Pkcs11Options(pkcs11_module.resolve(), pin_file.resolve())
        try:
            try:
                token_key: pki.PrivateKey = token_keys.load_token_key(key_uri, options)
                click.echo(f"using {token_keys.describe(token_key)}")
            except token_keys.KeySourceError as exc:
                if "no such private key" not in str(exc):
                    raise
                token_key = token_keys.generate_in_token(key_uri, options, key_type)
                click.echo(f"generated {token_keys.describe(token_key)}")
        except pki.PKIError as exc:
            raise click.ClickException(str(exc)) from None
        pki.write_cert(keys / "signing.pem",
                       ca.issue_signing_cert(token_key, name, service_address))
    else:
        signing_key = pki.new_key(kind)
        pki.write_key(keys / "signing.key", signing_key)
        pki.write_cert(keys / "signing.pem",
                       ca.issue_signing_cert(signing_key, name, service_address))
    tls_key = pki.new_key(kind)
    pki.write_key(keys / "tls.key", tls_key)
    pki.write_cert(keys / "tls.pem", ca.issue_tls_cert(tls_key, ["localhost", domain]))
    tsa_key = pki.new_key(kind)
    pki.write_key(keys / "tsa.key", tsa_key)
    pki.write_cert(keys / "tsa.pem", ca.issue_tsa_cert(tsa_key, f"{name} TSA"))
    shutil.copyfile(ca_dir / "ca.pem", keys / "ca.pem")
    if outside is not None and outside.roots:  # our own signatures must verify here too
        pki.write_certs(keys / "ca.pem", [*pki.load_certs(keys / "ca.pem"), *outside.roots])
    listen = Listen(host, submission_port, smtps_port, inbound_port)
    text = config_mod.render(name=name, domain=domain, data_dir=data_dir, listen=listen,
                             ca_certs="keys/ca.pem", http_port=http_port,
                             database_url=database_url)
    if key_uri is not None and pkcs11_module is not None and pin_file is not None:
        text = text.replace("[keys]\n", "[keys]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in (
                ("provider", key_uri), ("pkcs11_module", str(pkcs11_module.resolve())),
                ("pin_file", str(pin_file.resolve())))), 1)
    conf_path.write_text(text)
    cfg = config_mod.load(conf_path)
    conn = open_or_fail(cfg.paths.database)
    with conn:
        index_mod.store(conn, own_card(cfg))
    conn.close()
    click.echo(f"created provider {name} ({domain}) in {directory}")


def own_card(cfg: Config) -> index_mod.Provider:
    """This provider's card; during a renewal ([keys] next_cert) it lists both certificates."""
    from pecd import keyring

    try:
        cert, *more = keyring.published_certificates(cfg)
    except pki.PKIError as exc:
        raise click.ClickException(str(exc)) from None
    return index_mod.Provider(
        name=cfg.name, domains=cfg.domains, host=cfg.listen.host, port=cfg.listen.inbound_port,
        service_address=cfg.service_address, cert_pem=index_mod.cert_pem(cert),
        more_certs_pem=tuple(index_mod.cert_pem(c) for c in more),
        read_evidence=cfg.consultation.enabled,
    )


@main.command()
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes; above 1, a supervisor starts them, shares the ports"
                   " among them and restarts one that dies.")
@click.option("--reuse-port", is_flag=True,
              help="Share the listening ports with other pecd processes of this provider on"
                   " this machine (SO_REUSEPORT).")
@pass_ctx
def serve(ctx: Context, workers: int, reuse_port: bool) -> None:
    """Run every listener and stage until SIGTERM."""
    config = ctx.config  # a bad configuration fails here, once, not in every worker
    if workers > 1:
        from pecd import supervisor

        verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
        raise SystemExit(supervisor.run(ctx.config_path, workers, verbose))
    from pecd.edges import aio
    from pecd.service import serve as run

    try:
        aio.run(run(config, reuse_port=reuse_port))
    except pki.PKIError as exc:  # a key or certificate that cannot be used: say which, no traceback
        raise click.ClickException(str(exc)) from None
    except Unavailable as exc:  # PostgreSQL unreachable at start: one line, non-zero exit
        raise click.ClickException(f"database unreachable: {exc}") from None


# --- database ---------------------------------------------------------------------------------

@main.group("db")
def db_group() -> None:
    """The provider's database (SQLite file or PostgreSQL)."""


@db_group.command("copy")
@click.option("--to", "url", required=True, metavar="URL",
              help="An empty PostgreSQL database (postgresql://user@host/db).")
@pass_ctx
def db_copy(ctx: Context, url: str) -> None:
    """Copy this SQLite provider (queue and its bodies included) to PostgreSQL.

    Refuses a target that is not empty; verifies both ledgers before and after. Then set
    `[database] url` in the configuration to URL and restart: that is the whole move."""
    from pecd.store import copy as copy_mod
    from pecd.store import is_postgres
    from pecd.trust import tsa

    cfg = ctx.config
    if cfg.paths.database_url is not None:
        raise click.ClickException("this provider already runs on PostgreSQL ([database] url)")
    if not is_postgres(url):
        raise click.ClickException("--to must be a postgresql:// URL")
    roots = pki.load_certs(cfg.paths.ca_certs)

    def check_token(token: bytes, data: bytes) -> None:
        tsa.verify_token(token, data, roots)

    try:
        report = copy_mod.copy(cfg.paths.sqlite_file, cfg.paths.spool, url, check_token)
    except (copy_mod.CopyRefused, Unavailable) as exc:
        raise click.ClickException(str(exc)) from None
    total = sum(report.rows.values())
    click.echo(f"copied {total} rows from {len(report.rows)} tables and"
               f" {report.spool_bodies} spool bodies; ledger ok on both sides:"
               f" {report.ledger_rows} rows, {report.checkpoints} checkpoints")
    for name in report.missing_bodies:
        click.echo(f"warning: spool file {name} was missing; its item will be marked corrupt",
                   err=True)
    click.echo(f"now set [database] url to that URL in {ctx.config_path} and restart pecd")


# --- users ------------------------------------------------------------------------------------

@main.group()
def user() -> None:
    """Mailbox accounts."""


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


@user.command("add")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--operator", is_flag=True, help="May also open the operator page of the HTTP listener.")
@pass_ctx
def user_add(ctx: Context, address: str, password_stdin: bool, operator: bool) -> None:
    """Create a mailbox account."""
    if not ctx.config.is_local(address):
        raise click.ClickException(f"{address} is not in a domain of this provider")
    ctx.transact(users.add, address, _read_password(password_stdin))
    if operator:
        ctx.transact(apistore.set_operator, address, datetime.now(UTC))
    click.echo(f"added {address}{' (operator)' if operator else ''}")


@user.command("passwd")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_ctx
def user_passwd(ctx: Context, address: str, password_stdin: bool) -> None:
    """Change a password (also clears failed-login counts)."""
    ctx.transact(users.set_password, address, _read_password(password_stdin))
    click.echo(f"password changed for {address}")


@user.command("disable")
@click.argument("address")
@pass_ctx
def user_disable(ctx: Context, address: str) -> None:
    """Stop an account from logging in and receiving."""
    ctx.transact(users.set_disabled, address, True)
    click.echo(f"disabled {address}")


@user.command("enable")
@click.argument("address")
@pass_ctx
def user_enable(ctx: Context, address: str) -> None:
    """Re-enable (and unlock) an account."""
    ctx.transact(users.set_disabled, address, False)
    click.echo(f"enabled {address}")


@user.command("set")
@click.argument("address")
@click.option("--read-evidence/--no-read-evidence", "read_evidence", default=None,
              help="Ask for reading evidence (presa visione) on this user's messages unless a "
                   "message says otherwise (X-Presa-Visione); unset: [consultation] default.")
@click.option("--notify", metavar="ADDR2",
              help="An ordinary address told of each certified message delivered here (no "
                   "content); --notify '' stops the notices.")
@click.option("--quota", metavar="SIZE",
              help="Mailbox quota (e.g. 500MB, 2GB); --quota '' returns to [delivery] quota.")
@click.option("--postal-address", "postal", metavar="TEXT",
              help="The postal address the print fallback puts on its cover page (use \\n "
                   "between lines); --postal-address '' removes it.")
@click.option("--read-deadline", "read_deadline", metavar="PERIOD",
              help="How long this user has to open a certified message before the sender gets "
                   "the proof of not reading (s, m, h or d: 3d, 36h); --read-deadline default "
                   "returns to [consultation] deadline. Applies to messages delivered from now.")
@pass_ctx
def user_set(ctx: Context, address: str, read_evidence: bool | None, notify: str | None,
             quota: str | None, postal: str | None, read_deadline: str | None) -> None:
    """Change an account's settings."""
    if (read_evidence is None and notify is None and quota is None and postal is None
            and read_deadline is None):
        raise click.UsageError("nothing to set (see --help)")
    period: float | None = None
    if read_deadline is not None and read_deadline.strip().lower() != "default":
        try:
            period = config_mod.parse_duration(read_deadline, "--read-deadline")
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--read-deadline") from None
    size: int | None = None
    if quota:
        try:
            size = config_mod.parse_size(quota, "--quota")
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--quota") from None
    if notify:
        users.normalise(notify)  # a UserError says what is wrong with it

    def apply(conn: Connection) -> bool:
        found = True
        if read_evidence is not None:
            found = readings.set_user_default(conn, address, read_evidence)
        if notify is not None:
            found = readings.set_notify(conn, address, notify or None) and found
        if quota is not None:
            found = readings.set_quota(conn, address, size) and found
        if postal is not None:
            text = postal.replace("\\n", "\n").strip() or None
            found = readings.set_postal_address(conn, address, text) and found
        if read_deadline is not None:
            found = readings.set_read_deadline(conn, address, period) and found
        return found

    try:
        found = ctx.transact(apply)
    except users.UserError as exc:
        raise click.ClickException(str(exc)) from None
    if not found:
        raise click.ClickException(f"no such user: {address}")
    if read_evidence is not None:
        click.echo(f"{address}: read evidence {'on' if read_evidence else 'off'}")
    if notify is not None:
        click.echo(f"{address}: arrival notices {'to ' + notify if notify else 'off'}")
    if postal is not None:
        click.echo(f"{address}: postal address {'set' if postal.strip() else 'removed'}")
    if quota is not None:
        click.echo(f"{address}: quota {size if size is not None else 'provider default'}"
                   + (" bytes" if size is not None else ""))
    if read_deadline is not None:
        click.echo(f"{address}: read deadline "
                   + (f"{period:g} seconds" if period is not None else "provider default"))


@user.command("list")
@pass_ctx
def user_list(ctx: Context) -> None:
    """List accounts."""
    for address, disabled in ctx.transact(users.listing):
        click.echo(f"{address}{'  (disabled)' if disabled else ''}")


# --- API tokens -------------------------------------------------------------------------------

@main.group()
def token() -> None:
    """HTTP API tokens: each acts for one mailbox; shown once, stored hashed."""


@token.command("create")
@click.argument("address")
@click.option("--name", default="", help="A label to tell tokens apart (e.g. the calling system).")
@pass_ctx
def token_create(ctx: Context, address: str, name: str) -> None:
    """Make a token for a mailbox; prints it alone on the last line (it is not shown again)."""
    token_id, secret = ctx.transact(apistore.create_token, address, name, datetime.now(UTC))
    click.echo(f"token {token_id} for {users.normalise(address)}; store it now, it is not shown again:")
    click.echo(secret)


@token.command("list")
@click.argument("address", required=False)
@pass_ctx
def token_list(ctx: Context, address: str | None) -> None:
    """List tokens (id, mailbox, name, created, revoked), never their secrets."""
    for t in ctx.transact(apistore.list_tokens, address):
        state = f"revoked {t.revoked}" if t.revoked else "active"
        click.echo(f"{t.id}  {t.mailbox}  {t.name or '-'}  {t.created}  {state}")


@token.command("revoke")
@click.argument("token_id")
@pass_ctx
def token_revoke(ctx: Context, token_id: str) -> None:
    """Revoke a token by its id (as `token list` shows); it stops working at once."""
    mailbox = ctx.transact(apistore.revoke_token, token_id, datetime.now(UTC))
    click.echo(f"revoked {token_id} ({mailbox})")


@main.group()
def webhook() -> None:
    """Webhooks: each ledger event of a mailbox's messages POSTed, HMAC-signed, to a URL."""


@webhook.command("add")
@click.argument("address")
@click.argument("url")
@pass_ctx
def webhook_add(ctx: Context, address: str, url: str) -> None:
    """Subscribe URL to ADDRESS's message events; prints the signing secret alone on the last line."""
    hook_id, secret = ctx.transact(apistore.add_webhook, address, url, datetime.now(UTC))
    click.echo(f"webhook {hook_id} for {users.normalise(address)} -> {url}; signing secret"
               " (not shown again):")
    click.echo(secret)


@webhook.command("list")
@click.argument("address", required=False)
@pass_ctx
def webhook_list(ctx: Context, address: str | None) -> None:
    """List webhooks (id, mailbox, URL, created, removed)."""
    for w in ctx.transact(apistore.list_webhooks, address):
        state = f"removed {w.removed}" if w.removed else "active"
        click.echo(f"{w.id}  {w.mailbox}  {w.url}  {w.created}  {state}")


@webhook.command("remove")
@click.argument("hook_id")
@pass_ctx
def webhook_remove(ctx: Context, hook_id: str) -> None:
    """Stop a webhook; its pending deliveries are dropped."""
    mailbox = ctx.transact(apistore.remove_webhook, hook_id, datetime.now(UTC))
    click.echo(f"removed {hook_id} ({mailbox})")


# --- provider index ---------------------------------------------------------------------------

@main.group("index")
def index_group() -> None:
    """The provider index: which peers are trusted, for which domains."""


@index_group.command("export")
@click.option("--ldif", "as_ldif", is_flag=True,
              help="This provider's entry as LDIF (RFC 6109 §4.5 attributes) for the index authority,"
                   " instead of a JSON card.")
@click.option("--base", default=index_ldif.DEFAULT_BASE, show_default=True,
              help="With --ldif: the DN the entry sits under.")
@click.option("--unit", default="", help="With --ldif: providerUnit.")
@click.option("--location-url", default="", help="With --ldif: LDIFLocationURL.")
@pass_ctx
def index_export(ctx: Context, as_ldif: bool, base: str, unit: str, location_url: str) -> None:
    """Print this provider's card (or, with --ldif, its index entry) for others to import."""
    card = own_card(ctx.config)
    if not as_ldif:
        click.echo(card.card(), nl=False)
        return
    entry = dataclasses.replace(card, unit=unit, ldif_url=location_url)
    click.echo(index_ldif.entry_ldif(entry, base).decode(), nl=False)


def _take_copy(ctx: Context, source: str, obtain: Callable[[], index_mod.IndexCopy]) -> None:
    """Check a would-be index copy; replace the one in force only if it passes. Either way a
    ledger row says what happened; a refusal is one error line and a non-zero exit."""
    at = SystemClock().now()
    try:
        copy = obtain()
        ctx.write(index_mod.take_copy, copy, source, at)
    except index_mod.IndexError_ as exc:
        info = ctx.write(index_mod.refuse_copy, source, at, str(exc))
        still = f"; the copy of {info.fetched} stays in force" if info else ""
        raise click.ClickException(f"index refused: {exc}{still}") from None
    for why in copy.skipped:
        click.echo(f"left out: {why}", err=True)
    signer = f", signed by {copy.signer}" if copy.signer else ""
    click.echo(f"index copy replaced: {len(copy.providers)} providers from {source}{signer}")


@index_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--card", "kind", flag_value="card", help="FILE is a JSON provider card.")
@click.option("--ldif", "kind", flag_value="ldif",
              help="FILE is the index authority's signed LDIF (S/MIME multipart/signed,"
                   " application/pkcs7-mime, or CMS SignedData in DER or PEM).")
@click.option("--authority", "authority", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Index-authority certificate (default: [index] authority_cert).")
@pass_ctx
def index_import(ctx: Context, file: Path, kind: str | None, authority: Path | None) -> None:
    """Trust a peer's card, or take the authority's signed index as the index copy.

    Without --card/--ldif the kind is told from the content: a JSON object is a card, anything
    else must be a signed index. Unsigned LDIF, a wrong signer, altered content, a file over
    [index] max_size or one with no provider entry are refused; the copy in force stays.
    """
    data = file.read_bytes()
    if kind is None:
        kind = "card" if data.lstrip().startswith(b"{") else "ldif"
    if kind == "ldif":
        source = ctx.config.index

        def obtain() -> index_mod.IndexCopy:
            certs = index_sync.authority_certs(source, authority)
            return index_ldif.read_signed(data, str(file), certs, SystemClock().now(),
                                          source.max_size)

        _take_copy(ctx, str(file), obtain)
        return
    try:
        provider = index_mod.parse_card(data.decode("utf-8", "replace"))
    except index_mod.IndexError_ as exc:
        raise click.ClickException(str(exc)) from None
    conn = ctx.connect()
    with conn:
        index_mod.store(conn, provider)
    conn.close()
    click.echo(f"imported {provider.name} ({', '.join(provider.domains)}) {provider.fingerprint}")


@index_group.command("import-ldap")
@click.argument("url", required=False)
@click.option("--base", default=None, help="Search base (default: [index] base).")
@pass_ctx
def index_import_ldap(ctx: Context, url: str | None, base: str | None) -> None:
    """Read the provider entries from an LDAP server (URL, default [index] url) as the index copy.

    The read is anonymous and unsigned: trust comes from the server named, so prefer ldaps://.
    """
    source = ctx.config.index
    url = url or source.url
    if not url or not url.lower().startswith(("ldap://", "ldaps://")):
        raise click.ClickException("give an ldap:// or ldaps:// URL (or set [index] url to one)")
    base = base or source.base
    _take_copy(ctx, f"{url} {base}", lambda: index_sync.read_directory(url, base, source.timeout))


@index_group.command("refresh")
@click.option("--url", default=None, help="Fetch from here instead of [index] url.")
@pass_ctx
def index_refresh(ctx: Context, url: str | None) -> None:
    """Fetch the index now from [index] url (signed LDIF over HTTP(S), or an LDAP server)."""
    source = ctx.config.index
    where = url or source.url
    if not where:
        raise click.ClickException("no index source: set [index] url or give --url")
    _take_copy(ctx, where, lambda: index_sync.obtain(source, SystemClock(), url=where))


@index_group.command("status")
@pass_ctx
def index_status(ctx: Context) -> None:
    """Where the index copy in force came from, when, and who signed it."""
    info = ctx.transact(index_mod.copy_info)
    if info is None:
        click.echo("no index copy (only cards)")
        return
    click.echo(f"source:   {info.source} ({info.kind})\nfetched:  {info.fetched}\n"
               f"entries:  {info.entries}\nsha256:   {info.sha256}\n"
               f"signer:   {info.signer or '-'}\nsigned:   {info.signed_at or '-'}")


@index_group.command("list")
@pass_ctx
def index_list(ctx: Context) -> None:
    """List trusted providers."""
    conn = ctx.connect()
    for p in index_mod.load_all(conn):
        where = f"{p.host}:{p.port}" if p.host else f"(domain):{p.port}"
        origin = "index" if p.from_index_copy else "card"
        click.echo(f"{p.fingerprint[:16]}  {p.name}  {','.join(p.domains)}  {where}"
                   f"  {p.service_address or '-'}  {origin}")
    conn.close()


@index_group.command("remove")
@click.argument("fingerprint")
@pass_ctx
def index_remove(ctx: Context, fingerprint: str) -> None:
    """Stop trusting a card's certificate (a prefix of the fingerprint `index list` shows).

    Entries of the index copy go only with the next copy that no longer lists them."""
    conn = ctx.connect()
    with conn:
        matches = [p.fingerprint for p in index_mod.load_cards(conn)
                   if p.fingerprint.startswith(fingerprint.lower())]
        if len(matches) != 1:
            raise click.ClickException(f"{len(matches)} entries match {fingerprint}")
        index_mod.remove(conn, matches[0])
    conn.close()
    click.echo(f"removed {matches[0]}")


# --- evidence ---------------------------------------------------------------------------------

@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--ca", "ca_paths", type=click.Path(exists=True, path_type=Path), multiple=True,
              help="Trusted CA certificates: a PEM file or a directory of them; repeatable "
                   "(default: the provider configuration's, when there is one).")
@click.option("--system-roots", is_flag=True,
              help="Trust the system's CA bundle (Debian's ca-certificates), as for real providers.")
@click.option("--at", "at", type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"]),
              default=None, help="Judge the certificates at this UTC time instead of the signing time.")
@click.option("--require-timestamp", is_flag=True,
              help="Fail when the signature carries no RFC 3161 timestamp (pecd's own evidence has one).")
@click.option("--no-timestamp", is_flag=True, hidden=True,
              help="Kept for old scripts: a timestamp is no longer required unless asked for.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON for programs.")
@pass_ctx
def verify(ctx: Context, file: Path, ca_paths: tuple[Path, ...], system_roots: bool,
           at: datetime | None, require_timestamp: bool, no_timestamp: bool, as_json: bool) -> None:
    """Judge a signed PEC message (or a ledger export with its FILE.p7s): integrity, signer's
    chain at the signing time, timestamp. Needs no provider: trust comes from --ca or
    --system-roots. Exit 0 only when intact and trusted; otherwise the verdict's code:
    10 untrusted, 11 altered, 12 expired or not yet valid, 13 revoked, 14 revocation unknown,
    15 timestamp, 16 algorithm refused, 17 malformed / not a signed message."""
    from pecd.trust.judge import SYSTEM_ROOTS, judge, load_roots

    paths = list(ca_paths) + ([SYSTEM_ROOTS] if system_roots else [])
    policy = trust_mod.DEFAULT_POLICY
    try:
        if paths:
            roots = load_roots(paths)
        else:
            roots = pki.load_certs(ctx.config.paths.ca_certs)
            policy = ctx.config.trust.policy
    except (ValueError, OSError, pki.PKIError) as exc:
        raise click.ClickException(f"cannot load trust roots: {exc}") from None
    if require_timestamp and no_timestamp:
        raise click.UsageError("--require-timestamp and --no-timestamp contradict each other")
    detached = Path(f"{file}.p7s")
    if detached.exists():
        _verify_export(file, detached, roots, require_timestamp)
        return
    when = at.replace(tzinfo=UTC) if at is not None else None
    result = judge(file.read_bytes(), roots, at=when, policy=policy, require_timestamp=require_timestamp)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    else:
        _echo_verdict(result)
    if result.exit_code:
        sys.exit(result.exit_code)


def _echo_verdict(v: Verdict) -> None:
    click.echo(v.headline)
    if v.reason:
        click.echo(f"reason: {v.reason}")
    if v.kind == "valid":
        click.echo("signature: valid")
    if v.signer is not None:
        click.echo(f"signer: {describe(v.signer)}")
    for cert in v.chain[1:]:
        click.echo(f"  issued by: {describe(cert)}")
    if v.digest:
        weak = " (weak: accepted for interoperability)" if v.weak_digest else ""
        click.echo(f"digest: {v.digest}{weak}")
    if v.signing_time:
        click.echo(f"signing time: {v.signing_time.isoformat()} (the signer's claim)")
    if v.timestamp_time:
        click.echo(f"timestamp: {v.timestamp_time.isoformat()} (RFC 3161, verified)")
    elif v.kind == "valid":
        click.echo("timestamp: none (times are the signer's own claim)")
    if v.judged_at:
        click.echo(f"certificates judged at: {v.judged_at.isoformat()}")
    for key in ("structure", "type", "identifier", "sender", "issuer", "time"):
        if key in v.pec:
            click.echo(f"{key}: {v.pec[key]}" if key != "type" else
                       f"type: {v.pec['type']} (error: {v.pec.get('error')})")
    for r in v.pec.get("recipients", []):
        click.echo(f"recipient: {r['address']} ({r['kind']})")


@main.command()
@click.argument("message_id", required=False)
@pass_ctx
def status(ctx: Context, message_id: str | None) -> None:
    """Queue and ledger figures, or the ledger events of one message (PEC id or Message-ID)."""
    conn = ctx.connect()
    try:
        if message_id is None:
            for key, n in queue_mod.figures(conn).items():
                if n:
                    click.echo(f"queue {key}: {n}")
            count, head, cps = ledger.figures(conn)
            click.echo(f"ledger rows: {count} (head {head}), checkpoints: {cps}")
            for line in keys_cli.status_warnings(ctx.config, datetime.now(UTC)):
                click.echo(f"warning: {line}")
            return
        bare = message_id.strip().strip("<>")
        rows = ledger.events_for(conn, bare) or ledger.events_for(conn, f"<{bare}>")
        pec_id = next((str(r["msgid"]) for r in rows if r.get("msgid")), bare)
        sent = readings.tracked(conn, pec_id)
        held = readings.for_message(conn, pec_id)
    finally:
        conn.close()
    if not rows:
        raise click.ClickException(f"no ledger events for {message_id}")
    for row in rows:
        click.echo(json.dumps(row, sort_keys=True, default=str))
    for t in sent:  # we are the sender's provider: what came back
        click.echo(f"recipient {t['recipient']}: " + "; ".join(
            f"{label} {_when(t[col])}" for label, col in (
                ("accepted", "accepted"), ("taken in charge", "taken"),
                ("delivered", "delivered"), ("read", "read"), ("not read", "not_read"))
            if t[col] is not None) + (f"; outcome {t['outcome']}" if t["outcome"] else ""))
    for r in held:  # we are the recipient's provider: what we evidenced
        state = (f"read {_when(r.read)} ({r.read_via})" if r.read is not None else
                 f"not read by {_when(r.deadline)}" if r.not_read is not None else
                 f"not read yet (deadline {_when(r.deadline)})")
        extra = f"; not-read evidence {_when(r.not_read)}" if (
            r.not_read is not None and r.read is not None) else ""
        click.echo(f"reading {r.recipient}: delivered {_when(r.delivered)}; {state}{extra}")
    for row in rows:  # the fallback channels run for an unread message
        if row.get("event") in ("fallback", "fallback-failed"):
            detail = row.get("detail")
            channel = detail.get("channel") if isinstance(detail, dict) else None
            outcome = "run" if row["event"] == "fallback" else "failed"
            recipients = row.get("recipients")
            who = ",".join(map(str, recipients)) if isinstance(recipients, list | tuple) else ""
            click.echo(f"fallback {who}: {channel} {outcome} {row.get('at', '')}")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# --- queue ------------------------------------------------------------------------------------

@main.group("queue")
def queue_group() -> None:
    """The durable queue: inspect, retry, hold and release items."""


@queue_group.command("list")
@click.option("--state", type=click.Choice(["incoming", "active", "deferred", "hold", "corrupt"]))
@pass_ctx
def queue_list(ctx: Context, state: str | None) -> None:
    """List queue items (id, kind, state, attempts, destination, recipients, last error)."""
    for r in ctx.transact(queue_mod.listing, state):
        click.echo(f"{r['id']}\t{r['kind']}\t{r['state']}\t{r['attempts']}\t{r['dest'] or '-'}"
                   f"\t{','.join(json.loads(r['rcpts']))}\t{r['last_error'] or ''}")


@queue_group.command("show")
@click.argument("item_id", type=int)
@pass_ctx
def queue_show(ctx: Context, item_id: int) -> None:
    """Show one queue item."""
    click.echo(json.dumps(ctx.transact(queue_mod.show, item_id), indent=2, default=str))


def _operator_command(name: str, fn: Any, help_text: str) -> None:
    @queue_group.command(name, help=help_text)
    @click.argument("item_id", type=int)
    @pass_ctx
    def command(ctx: Context, item_id: int) -> None:
        ctx.transact(fn, item_id, datetime.now(UTC))
        click.echo(f"{name}: item {item_id}")


_operator_command("retry", queue_mod.retry, "Try a deferred or held item now.")
_operator_command("hold", queue_mod.hold, "Park an item until released.")
_operator_command("release", queue_mod.release, "Return a held item to the queue.")


@main.group("ledger")
def ledger_group() -> None:
    """The append-only, hash-chained event ledger."""


@ledger_group.command("verify")
@pass_ctx
def ledger_verify(ctx: Context) -> None:
    """Recompute the hash chain and checkpoints; name the first bad row."""
    from pecd.trust import tsa

    roots = pki.load_certs(ctx.config.paths.ca_certs)

    def check_token(token: bytes, data: bytes) -> None:
        tsa.verify_token(token, data, roots)

    conn = ctx.connect()
    report = ledger.verify(conn, token_verifier=check_token)
    conn.close()
    if not report.ok:
        where = (f"row {report.first_bad_seq}" if report.first_bad_seq is not None
                 else f"checkpoint {report.bad_checkpoint}")
        raise click.ClickException(f"ledger BROKEN at {where}: {report.reason}")
    click.echo(f"ledger ok: {report.rows} rows, {report.checkpoints} checkpoints")


@ledger_group.command("export")
@click.option("--since", type=click.DateTime(), default=None, help="From this UTC time (inclusive).")
@click.option("--until", type=click.DateTime(), default=None, help="Up to this UTC time (exclusive).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="JSON Lines file to write; the signature goes to OUTPUT.p7s.")
@pass_ctx
def ledger_export(ctx: Context, since: datetime | None, until: datetime | None,
                  output: Path) -> None:
    """Write ledger rows as JSON Lines plus a detached, timestamped CMS signature (OUTPUT.p7s).

    An auditor checks it offline with `pecd verify OUTPUT` or with
    `openssl cms -verify -binary -inform DER -in OUTPUT.p7s -content OUTPUT -CAfile ca.pem`."""
    from pecd.clock import SystemClock
    from pecd.service import make_issuer, make_timestamper

    cfg = ctx.config
    conn = ctx.connect()
    rows = list(ledger.export_rows(conn, since and since.replace(tzinfo=UTC),
                                   until and until.replace(tzinfo=UTC)))
    conn.close()
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    payload = data.encode()
    clock = SystemClock()
    signer = make_issuer(cfg, clock, make_timestamper(cfg, clock)).signer
    # the ledger names senders, recipients and subjects: owner-only, whatever the umask
    durable.write_private(output, payload)
    durable.write_private(Path(f"{output}.p7s"), signer.sign_detached(payload))
    click.echo(f"exported {len(rows)} rows to {output} (signature {output}.p7s)")


def _check_export(file: Path, signature: Path, roots: list[Any],
                  require_ts: bool) -> tuple[list[dict[str, Any]], Any]:
    """A ledger export's rows, once its signature and its hash chain both hold."""
    from pecd.trust.cms import verify_detached

    data = file.read_bytes()
    try:
        info = verify_detached(signature.read_bytes(), data, roots, require_timestamp=require_ts)
    except SignatureInvalid as exc:
        raise click.ClickException(f"NOT VALID: {exc}") from None
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    for prev, row in zip([None, *rows], rows, strict=False):
        if ledger.row_hash(str(row["prev_hash"]), row) != row["hash"]:
            raise click.ClickException(f"NOT VALID: row {row['seq']} does not match its hash")
        if prev is not None and row["prev_hash"] != prev["hash"]:
            raise click.ClickException(f"NOT VALID: chain broken before row {row['seq']}")
    return rows, info


def _verify_export(file: Path, signature: Path, roots: list[Any], require_ts: bool) -> None:
    rows, info = _check_export(file, signature, roots, require_ts)
    click.echo("signature: valid")
    click.echo(f"signer: {info.signer.subject.rfc4514_string()}")
    if info.timestamp_time:
        click.echo(f"timestamp: {info.timestamp_time.isoformat()} (RFC 3161, verified)")
    click.echo(f"ledger export: {len(rows)} rows, hash chain intact")


@ledger_group.command("prune")
@click.option("--before", type=click.DateTime(), default=None,
              help="Remove rows older than this UTC time (default: 30 months ago, PEC retention).")
@click.option("--export", "export_file", type=click.Path(exists=True, path_type=Path),
              required=True, help="A `ledger export` (with its .p7s) holding every row to remove.")
@pass_ctx
def ledger_prune(ctx: Context, before: datetime | None, export_file: Path) -> None:
    """Let old rows leave the live ledger once a signed export holds them.

    Only whole checkpointed ranges leave; the remaining chain starts from an anchor that
    `ledger verify` checks against the checkpoint's timestamped head."""
    import hashlib
    from datetime import timedelta

    limit = before.replace(tzinfo=UTC) if before else datetime.now(UTC) - timedelta(days=913)
    roots = pki.load_certs(ctx.config.paths.ca_certs)
    rows, _info = _check_export(export_file, Path(f"{export_file}.p7s"), roots, True)
    by_seq = {int(r["seq"]): r for r in rows}
    digest = hashlib.sha256(export_file.read_bytes()).hexdigest()
    conn = ctx.connect()
    try:
        conn.execute("BEGIN IMMEDIATE")
        point = ledger.prune_point(conn, limit)
        if point is None:
            raise click.ClickException("nothing to prune: no checkpointed range is that old")
        first = ledger.first_seq(conn)
        for seq in (first, point):
            if seq not in by_seq or by_seq[seq]["hash"] != ledger.hash_at(conn, seq):
                raise click.ClickException(
                    f"the export does not hold row {seq} as the ledger has it; export first")
        if any(s not in by_seq for s in range(first, point + 1)):
            raise click.ClickException("the export misses rows in the range to prune")
        removed = ledger.prune(conn, point, digest, datetime.now(UTC))
        ledger.append(conn, ledger.LedgerEvent(event="ledger-pruned", detail={
            "up_to_seq": point, "rows": removed, "export_sha256": digest}), datetime.now(UTC))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    click.echo(f"pruned {removed} rows up to seq {point}; keep {export_file} and its .p7s")


from pecd import keys_cli  # noqa: E402 - `pecd keys`, its own module (registered last)

keys_cli.register(main)


if __name__ == "__main__":
    main()
