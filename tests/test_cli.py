"""The CLI is a contract: every command has help, bad input fails with one line and non-zero."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pecd import config
from pecd.cli import main

from .conftest import ProviderDir, make_provider

ROOT = Path(__file__).resolve().parent.parent


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


@pytest.mark.parametrize("path", _commands(main))
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert len(result.output.splitlines()) > 2
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    assert cmd.help or cmd.short_help, f"{' '.join(path)} has no help text"


def test_sample_config_loads() -> None:
    cfg = config.load(ROOT / "conf" / "pecd.toml")
    assert cfg.domains == ("example.org",)
    assert cfg.delivery.method == "maildir" and cfg.tsa_url is None


@pytest.mark.parametrize("args", [
    ["-c", "/nonexistent/pecd.toml", "status"],
    ["-c", "/nonexistent/pecd.toml", "user", "list"],
])
def test_missing_config_is_one_clear_line(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.output.strip().startswith("Error: no configuration file")
    assert "Traceback" not in result.output


def test_bad_input_fails_cleanly(tmp_path: Path) -> None:
    a: ProviderDir = make_provider(tmp_path, "a.test", tmp_path / "ca")
    for args, message in [
        (["user", "add", "someone@elsewhere.test", "--password-stdin"], "not in a domain"),
        (["user", "disable", "ghost@a.test"], "no such user"),
        (["queue", "show", "999"], "no queue item"),
        (["status", "<nothing@here>"], "no ledger events"),
    ]:
        out = a.cli(*args, input="pw\n", ok=False)
        assert message in out, (args, out)
        assert len(out.strip().splitlines()) == 1
    bogus = tmp_path / "bogus.card"
    bogus.write_text("{not json")
    assert "not a provider card" in a.cli("index", "import", str(bogus), ok=False)
    junk = tmp_path / "junk.eml"
    junk.write_bytes(b"Subject: hi\r\n\r\nnot signed\r\n")
    assert "NOT VALID" in a.cli("verify", str(junk), ok=False)
    result = CliRunner().invoke(main, ["init", str(a.root), "--domain", "a.test"])
    assert result.exit_code != 0 and "refusing to overwrite" in result.output


def test_init_writes_private_keys_0600(tmp_path: Path) -> None:
    a = make_provider(tmp_path, "a.test", tmp_path / "ca")
    keys = [*sorted((a.root / "keys").glob("*.key")), tmp_path / "ca" / "ca.key"]
    assert len(keys) == 4
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600, key
