"""``pecd db copy``: a SQLite provider with queued mail (a body in a spool file among them) moves
to PostgreSQL, and after the config names the copy the same provider delivers what was queued."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pecd import config
from pecd.service import Service
from pecd.store.queue import INLINE_MAX

from .conftest import ProviderDir, running, submit, wait_for
from .pechelpers import queued
from .test_end_to_end import ORIGINAL


def _big() -> bytes:
    line = b"x" * 76 + b"\r\n"
    return ORIGINAL.rstrip(b"\r\n") + b"\r\n" + line * (INLINE_MAX // len(line) + 100)


def test_copy_to_postgresql_then_serve_delivers_the_queue(
        two_providers: tuple[ProviderDir, ProviderDir], pg_url: str) -> None:
    a, b = two_providers

    async def queue_two() -> None:
        svc = Service(a.config)
        await svc.start(runners=False)  # the listener only: the items stay queued
        try:
            loop = asyncio.get_running_loop()
            for data in (ORIGINAL, _big()):
                code, reply = await loop.run_in_executor(
                    None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                    ["bob@b.test"], data, svc.ports.submission)
                assert code == 250, reply
            assert svc.checkpoint() is not None  # a timestamped checkpoint travels too
        finally:
            await svc.stop()

    asyncio.run(queue_two())
    assert queued(a) == 2
    assert len(list((a.root / "data" / "spool" / "q").iterdir())) == 1  # the big one's file

    out = a.cli("db", "copy", "--to", pg_url)
    assert "1 spool bodies" in out and "ledger ok on both sides" in out and "1 checkpoints" in out
    # a second copy onto the now non-empty database is refused, and changes nothing
    again = a.cli("db", "copy", "--to", pg_url, ok=False)
    assert "not empty" in again

    config.use_database(a.conf, pg_url)
    assert a.config.paths.database == pg_url
    assert queued(a) == 2  # now read from PostgreSQL
    assert "ledger ok" in a.cli("ledger", "verify") and "1 checkpoints" in a.cli("ledger", "verify")

    async def deliver() -> None:
        async with running(a, b):
            await wait_for(lambda: len(b.messages("bob@b.test")) == 2
                           and len(a.messages("alice@a.test")) == 2 + 2, 60)
            await wait_for(lambda: not queued(a) and not queued(b))

    asyncio.run(deliver())
    bodies = sorted(len(m) for m in b.messages("bob@b.test"))
    assert bodies[1] > INLINE_MAX  # the spool body arrived whole, from its chunks
    assert a.query("SELECT count(*) FROM body_chunks")[0][0] == 0
    ids = [r[0] for r in a.query("SELECT id FROM queue")]
    assert ids == []
    assert "ledger ok" in a.cli("ledger", "verify")


def test_copy_refuses_a_non_postgresql_target(two_providers: tuple[ProviderDir, ProviderDir],
                                              tmp_path: Path) -> None:
    a, _ = two_providers
    assert "postgresql://" in a.cli("db", "copy", "--to", str(tmp_path / "x.sqlite"), ok=False)
