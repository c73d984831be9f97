"""A loose umask (022, the usual default) must not open pecd's mail, ledger or exports to other
local users: the directories pecd makes are 0700 and the files it writes 0600, whatever the
umask of the process that runs it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pecd.points.delivery import Maildir
from pecd.store import durable
from pecd.store.spool import Spool

from .conftest import pecd


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dirs_under(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


def test_attack_loose_umask_init_makes_owner_only_directories(tmp_path: Path,
                                                               loose_umask: None) -> None:
    pecd("init", str(tmp_path / "p"), "--domain", "p.test", "--ca", str(tmp_path / "ca"))
    root = tmp_path / "p"
    dirs = [*_dirs_under(root / "data"), root / "keys", tmp_path / "ca"]
    assert len(dirs) >= 3
    for d in dirs:
        assert _mode(d) == 0o700, d
    assert _mode(root / "data" / "pecd.sqlite") == 0o600


def test_attack_loose_umask_maildir_and_spool_are_owner_only(tmp_path: Path,
                                                              loose_umask: None) -> None:
    box = Maildir(tmp_path / "mail", "host.test")
    stored = box.store("alice@a.test", "k1", 1_700_000_000.0, b"Subject: x\r\n\r\nsecret\r\n")
    for d in _dirs_under(tmp_path / "mail"):  # mail/, the domain, the mailbox, tmp/new/cur
        assert _mode(d) == 0o700, d
    assert len(_dirs_under(tmp_path / "mail")) == 6
    assert _mode(stored) == 0o600
    Spool(tmp_path / "spool")
    for d in _dirs_under(tmp_path / "spool"):
        assert _mode(d) == 0o700, d


def test_attack_loose_umask_ledger_export_is_owner_only(tmp_path: Path,
                                                         loose_umask: None) -> None:
    pecd("init", str(tmp_path / "p"), "--domain", "p.test", "--ca", str(tmp_path / "ca"))
    out = tmp_path / "export.jsonl"
    out.write_text("an older, world-readable export\n")
    os.chmod(out, 0o644)
    pecd("-c", str(tmp_path / "p" / "pecd.toml"), "ledger", "export", "-o", str(out))
    for path in (out, Path(f"{out}.p7s")):
        assert _mode(path) == 0o600, path
    assert "older" not in out.read_text()  # replaced, not appended to
    assert not list(tmp_path.glob(".export*"))  # no temporary file left behind


def test_private_dir_leaves_existing_directories_alone(tmp_path: Path,
                                                       loose_umask: None) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    assert _mode(shared) == 0o755  # what the umask made: the operator's choice
    made = durable.private_dir(shared / "a" / "b")
    assert _mode(shared) == 0o755
    assert _mode(shared / "a") == _mode(made) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        durable.private_dir(tmp_path / "file")
