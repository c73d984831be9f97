"""``pecd keys``: signing keys made and kept where they live (a PKCS#11 token), and what the
provider signs with. A thin click layer over pecd.trust.keys and pecd.keyring.

The PIN is read from ``--pin-file`` / ``--pin-env`` or the configuration's ``[keys]``; it is never
an option value (it would land in the shell history and the process list).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography import x509

from pecd import keyring
from pecd.config import Config, ConfigError
from pecd.config import load as load_config
from pecd.trust import keys, pki


def _config(ctx: click.Context) -> Config | None:
    """The provider configuration when there is one (``keys generate`` works without)."""
    path = getattr(ctx.find_root().obj, "config_path", None)
    if path is None or not Path(path).exists():
        return None
    try:
        return load_config(Path(path))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _options(cfg: Config | None, module: Path | None, pin_file: Path | None,
             pin_env: str | None) -> keys.Pkcs11Options:
    base = cfg.keys.pkcs11 if cfg is not None else keys.Pkcs11Options()
    if pin_file is not None or pin_env is not None:
        base = keys.Pkcs11Options(base.module, pin_file, pin_env)
    if module is not None:
        base = keys.Pkcs11Options(module, base.pin_file, base.pin_env)
    if base.module is None:
        raise click.ClickException("which PKCS#11 module? --module PATH or [keys] pkcs11_module")
    return base


def token_options(f: click.decorators.FC) -> click.decorators.FC:
    for opt in reversed([
        click.option("--module", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="PKCS#11 module (default: [keys] pkcs11_module)."),
        click.option("--pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="File holding the user PIN (default: [keys] pin_file)."),
        click.option("--pin-env", default=None, metavar="NAME",
                     help="Environment variable holding the user PIN (default: [keys] pin_env)."),
    ]):
        f = opt(f)
    return f


@click.group("keys")
def keys_group() -> None:
    """Signing keys: in a PKCS#11 token (HSM) or in files; certificates and their expiry."""


def issue(ca_dir: Path, key: pki.PrivateKey, purpose: str, name: str, email: str
          ) -> x509.Certificate:
    ca = pki.CertAuthority.load_or_create(ca_dir)
    if purpose == "tsa":
        return ca.issue_tsa_cert(key, f"{name} TSA")
    return ca.issue_signing_cert(key, name, email)


@keys_group.command("generate")
@click.option("--pkcs11", "uri", required=True, metavar="URI",
              help='Where the key is made, e.g. "pkcs11:token=pecd;object=provider-2027".')
@click.option("--type", "kind", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@click.option("--purpose", type=click.Choice(["signing", "tsa"]), default="signing",
              show_default=True, help="What the certificate will be for.")
@click.option("--csr", "csr_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the certificate request here (default: print it).")
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), default=None,
              help="Dev CA directory: issue the certificate at once instead of a request.")
@click.option("--cert", "cert_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --ca: write the certificate here (it is stored in the token too).")
@click.option("--name", default=None, help="Provider name (default: [provider] name).")
@click.option("--email", default=None, help="Service address (default: [provider] service_address).")
@token_options
@click.pass_context
def generate(ctx: click.Context, uri: str, kind: str, purpose: str, csr_out: Path | None,
             ca_dir: Path | None, cert_out: Path | None, name: str | None, email: str | None,
             module: Path | None, pin_file: Path | None, pin_env: str | None) -> None:
    """Make a key pair inside the token (sensitive, never extractable), then a CSR for it, or
    with --ca the dev CA's certificate."""
    cfg = _config(ctx)
    options = _options(cfg, module, pin_file, pin_env)
    name = name or (cfg.name if cfg else None)
    email = email or (cfg.service_address if cfg else None)
    if name is None or email is None:
        raise click.ClickException("--name and --email are needed without a configuration")
    try:
        key = keys.generate_in_token(uri, options, kind)
        click.echo(f"generated {keys.describe(key)}", err=True)
        if ca_dir is not None:
            cert = issue(ca_dir, key, purpose, name, email)
            keys.store_certificate(cert, key.uri, options)
            if cert_out is not None:
                pki.write_cert(cert_out, cert)
            click.echo(f"certificate {cert.subject.rfc4514_string()} valid until"
                       f" {cert.not_valid_after_utc:%Y-%m-%d}", err=True)
            return
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name),
                             x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, name)])
        request = keys.make_csr(key, subject, email if purpose == "signing" else None)
    except pki.PKIError as exc:
        raise click.ClickException(str(exc)) from None
    if csr_out is not None:
        csr_out.write_bytes(request)
        click.echo(f"certificate request written to {csr_out}", err=True)
    else:
        click.echo(request.decode(), nl=False)


@keys_group.command("import")
@click.argument("key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--pkcs11", "uri", required=True, metavar="URI", help="Where the key goes.")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Store this certificate beside the key too.")
@token_options
@click.pass_context
def import_(ctx: click.Context, key_file: Path, uri: str, cert_file: Path | None,
            module: Path | None, pin_file: Path | None, pin_env: str | None) -> None:
    """Move a PEM key into the token (migration from file keys). The token copy is sensitive and
    not extractable; destroy the PEM file once [keys] points at the token."""
    options = _options(_config(ctx), module, pin_file, pin_env)
    try:
        pem_key = pki.load_key(key_file)
        cert = pki.load_cert(cert_file) if cert_file else None
        if cert is not None and cert.public_key() != pem_key.public_key():
            raise click.ClickException(f"{key_file} does not belong to {cert_file}")
        key = keys.import_into_token(pem_key, uri, options)
        if cert is not None:
            keys.store_certificate(cert, key.uri, options)
    except pki.PKIError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"imported {key_file} as {keys.describe(key)}; now set [keys] and remove"
               f" the PEM file (e.g. shred -u {key_file})")


def _describe(what: str, ref: str | Path, cert_path: Path, cfg: Config, now: datetime
              ) -> list[tuple[str, x509.Certificate]]:
    try:
        key = keyring.load(ref, cfg)
        certs = keyring.certificates(ref, cert_path, cfg)
    except pki.PKIError as exc:
        click.echo(f"{what}: {ref}: {exc}")
        return []
    cert = certs[0]
    where = cert_path if cert_path.exists() or not keys.is_uri(ref) else "token"
    state = "expired" if cert.not_valid_after_utc < now else "valid"
    click.echo(f"{what}: key {keys.describe(key) if keys.is_uri(ref) else ref}")
    click.echo(f"  certificate {cert.subject.rfc4514_string()} ({where}), {state} until"
               f" {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z, serial {cert.serial_number:x}")
    return [(what, cert)]


@keys_group.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """What the provider signs with (provider key, next key, TSA key), and each certificate's
    expiry; a warning for each certificate that expires within 30 days."""
    cfg = _config(ctx)
    if cfg is None:
        raise click.ClickException("no configuration (-c pecd.toml)")
    now = datetime.now(UTC)
    seen = _describe("provider", keyring.provider_ref(cfg), cfg.paths.signing_cert, cfg, now)
    k = cfg.keys
    if k.next_key is not None and k.next_cert is not None:
        seen += _describe("next", k.next_key, k.next_cert, cfg, now)
        click.echo(f"  signing switches to it at {k.switch_at:%Y-%m-%d %H:%M %Z}"
                   f" ({'done' if k.switch_at and k.switch_at <= now else 'pending'})")
    if cfg.tsa_url is None or keys.is_uri(keyring.tsa_ref(cfg)) or Path(keyring.tsa_ref(cfg)).exists():
        seen += _describe("tsa", keyring.tsa_ref(cfg), cfg.paths.tsa_cert, cfg, now)
    for line in status_warnings(cfg, now, seen):
        click.echo(f"warning: {line}")


def status_warnings(cfg: Config, now: datetime,
                    seen: list[tuple[str, x509.Certificate]] | None = None) -> list[str]:
    """For ``pecd status`` and ``pecd keys list``: certificates expiring within 30 days. The
    one in use during a renewal is not warned about once the next one takes over in time."""
    if seen is None:
        seen = []
        for what, path in (("provider", cfg.paths.signing_cert), ("tsa", cfg.paths.tsa_cert)):
            if path.exists():  # status reads files only: it does not log in to the token
                seen.append((what, pki.load_cert(path)))
        if cfg.keys.next_cert is not None and cfg.keys.next_cert.exists():
            seen.append(("next", pki.load_cert(cfg.keys.next_cert)))
    k = cfg.keys
    switching = {what for what, cert in seen if what == "provider" and k.switch_at is not None
                 and k.switch_at <= cert.not_valid_after_utc}
    return keyring.expiry_warnings([(w, c) for w, c in seen if w not in switching], now)


def register(main: click.Group) -> None:
    main.add_command(keys_group)
