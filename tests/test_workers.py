"""Several processes serving one provider: ``pecd serve --workers N`` (the supervisor), queue
leases between processes, and timers that fire once however many processes run them.

Real processes throughout; a test clock (:class:`~pecd.clock.ManualClock`) in the processes
that race for a timer, and a file as the starting gun so that both decide before either commits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

from pecd.clock import ManualClock
from pecd.service import Runner, Service
from pecd.store import Unavailable, nodes
from pecd.store.db import Database
from pecd.store.queue import Item, NewItem, Outcome, Queue
from pecd.store.spool import Spool

from .conftest import ProviderDir, submit
from .test_timeouts_virus import _submit_and_accept


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(x) for x in path.read_text().split()} if path.exists() else set()


def _wait(predicate: object, timeout: float = 60.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in time"
        time.sleep(0.05)


def test_workers_supervisor_restarts_a_killed_worker_and_stops_cleanly(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, _ = two_providers
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        sup = subprocess.Popen([sys.executable, "-m", "pecd", "-c", str(a.conf), "serve",
                                "--workers", "2"], stdout=out, stderr=subprocess.STDOUT)
    try:
        def up(n: int) -> bool:
            assert sup.poll() is None, log.read_text()[-3000:]
            return log.read_text().count("pecd serving") >= n

        _wait(lambda: up(2), what="two workers serving")
        workers = _children(sup.pid)
        assert len(workers) == 2
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: up(3), what="the killed worker started again")
        after = _children(sup.pid)
        assert len(after) == 2 and victim not in after and sorted(workers)[1] in after
        # both share the port: submissions keep being accepted
        port = a.config.listen.submission_port
        for i in range(4):
            code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test",
                                 ["bob@b.test"], b"From: alice@a.test\r\nTo: bob@b.test\r\n"
                                 b"Subject: w" + str(i).encode() + b"\r\n\r\nhi\r\n", port)
            assert code == 250, reply
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0, log.read_text()[-3000:]
        for pid in after:  # no worker outlives its supervisor
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
                f"/proc/{pid}/status").read_text()
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def test_workers_supervisor_dies_its_workers_stop(two_providers: tuple[ProviderDir, ProviderDir],
                                                   tmp_path: Path) -> None:
    a, _ = two_providers
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        sup = subprocess.Popen([sys.executable, "-m", "pecd", "-c", str(a.conf), "serve",
                                "--workers", "2"], stdout=out, stderr=subprocess.STDOUT)
    _wait(lambda: log.read_text().count("pecd serving") >= 2, what="two workers serving")
    workers = _children(sup.pid)
    sup.kill()
    sup.wait()
    _wait(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), what="workers gone")


def test_start_takes_back_only_dead_processes_leases(tmp_path: Path) -> None:
    """A process starting beside a live one leaves its leases alone; a dead one's come back at
    once (same host), and an expired lease comes back to whoever leases next."""
    clock = ManualClock()
    db = Database(tmp_path / "db.sqlite")
    spool = Spool(tmp_path / "spool")
    run = tmp_path / "run"

    async def scenario() -> None:
        live_q = Queue(db, spool, clock)
        dead_q = Queue(db, spool, clock)
        live_node = nodes.Node(run, live_q.owner)
        assert live_node.alone
        live_node.started()  # recovery over: others may start
        dead_node = nodes.Node(run, dead_q.owner)
        dead_node.started()
        await live_q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"1")])
        (live_item,) = await live_q.lease("relay", 10)
        await live_q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"2")])
        (dead_item,) = await dead_q.lease("relay", 10)
        dead_node.close()  # the process is gone (its lock went with it)
        new_q = Queue(db, spool, clock)
        new_node = nodes.Node(run, new_q.owner)
        assert not new_node.alone  # the live process runs: no spool cleanup
        recovery = new_q.recover(new_node)
        assert recovery.released == 1
        (again,) = await new_q.lease("relay", 10)
        assert again.id == dead_item.id
        # the dead process's outcome, should it come late, commits nothing; the new one does
        assert await dead_q.finish(dead_item, Outcome()) is False
        assert await new_q.finish(again, Outcome()) is True
        # the live process's lease stays until it expires, then anyone may take it back
        assert await new_q.lease("relay", 10) == []
        clock.advance(timedelta(seconds=601))
        (taken,) = await new_q.lease("relay", 10)
        assert taken.id == live_item.id
        assert await live_q.finish(live_item, Outcome(
            outputs=[NewItem("deliver", "a@a.test", ("b@b.test",), data=b"twice?")])) is False
        assert await new_q.finish(taken, Outcome(
            outputs=[NewItem("deliver", "a@a.test", ("b@b.test",), data=b"once")])) is True
        rows = await db.transact(lambda c: c.execute(
            "SELECT kind, body FROM queue ORDER BY id").fetchall())
        assert [(r[0], r[1]) for r in rows] == [("deliver", b"once")]
        # a sibling that dies while others run: a live process takes its leases back at once
        short_q = Queue(db, spool, clock)
        short_node = nodes.Node(run, short_q.owner)
        short_node.started()
        await live_q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"3")])
        (short_item,) = await short_q.lease("relay", 10)
        assert await live_q.take_back(live_node) == 0  # it still runs
        short_node.close()
        assert await live_q.take_back(live_node) == 1
        (back,) = await live_q.lease("relay", 10)
        assert back.id == short_item.id
        new_node.close()
        live_node.close()

    try:
        asyncio.run(scenario())
    finally:
        db.close()


# the child side of the timer race: decide, wait for the gun, commit; prints what it committed
_RACER = textwrap.dedent("""
    import asyncio, json, sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from pecd import config
    from pecd.clock import ManualClock
    from pecd.points import timeouts
    from pecd.service import Service

    from pecd.store import readings

    async def main(conf, at, ready, gun, what):
        svc = Service(config.load(Path(conf)), clock=ManualClock(datetime.fromtimestamp(at, UTC)))
        if what == "timeouts":
            worker = svc.timeouts
            rows = await svc.db.transact(lambda c: timeouts.load_open(c, at))
            dues = timeouts.decide(rows, at, worker.policy)
            names = [d.action for d in dues]
            commit = worker.commit
        else:  # the not-read deadline of reading evidence
            dues = await svc.db.transact(lambda c: readings.due_not_read(c, at))
            names = ["not-read" for _ in dues]
            commit = lambda row: svc.reading._commit(row, "ContentHandoverFailure")
        Path(ready).touch()
        while not Path(gun).exists():
            time.sleep(0.01)
        committed = [await commit(d) for d in dues]
        svc.cpu.shutdown()
        svc.db.close()
        print(json.dumps({"due": names, "committed": sum(committed)}))

    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
""")


def _race(p: ProviderDir, at: float, tmp: Path, name: str,
          what: str = "timeouts") -> list[dict[str, object]]:
    gun = tmp / f"{name}.go"
    procs = []
    for i in range(2):
        ready = tmp / f"{name}.{i}.ready"
        procs.append((ready, subprocess.Popen(
            [sys.executable, "-c", _RACER, str(p.conf), str(at), str(ready), str(gun), what],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    _wait(lambda: all(r.exists() or proc.poll() is not None for r, proc in procs),
          what="both racers decided")
    gun.touch()
    out = []
    for _, proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _events(p: ProviderDir, event: str) -> int:
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        return int(conn.execute("SELECT count(*) FROM ledger WHERE event=?", (event,)).fetchone()[0])
    finally:
        conn.close()


def test_a_lease_given_up_while_the_database_is_away_returns_before_it_expires(
        tmp_path: Path) -> None:
    """A stage that fails with ``Unavailable`` (PostgreSQL restarted under it) gives its item
    up: the next take-back returns it although its owner is alive and the lease has not
    expired (before, it waited ten minutes; the PostgreSQL crash test's drain stalled on it)."""
    clock = ManualClock()
    db = Database(tmp_path / "db.sqlite")
    spool = Spool(tmp_path / "spool")

    async def scenario() -> None:
        queue = Queue(db, spool, clock)
        node = nodes.Node(tmp_path / "run", queue.owner)
        node.started()
        seen: list[int] = []

        async def away(item: Item) -> Outcome:
            seen.append(item.id)
            raise Unavailable("PostgreSQL: server closed the connection unexpectedly")

        await queue.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"1")])
        runner = Runner(queue, "relay", away, 4)
        assert await runner.run_once() == 1
        assert await queue.lease("relay", 10) == []  # still leased to this live process
        assert await queue.take_back(node) == 1
        (again,) = await queue.lease("relay", 10)
        assert again.id == seen[0]
        assert await queue.finish(again, Outcome()) is True
        assert await queue.take_back(node) == 0
        node.close()

    try:
        asyncio.run(scenario())
    finally:
        db.close()


def test_timeout_notices_fire_once_with_two_processes(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    """Both processes see the 12 h warning due and build it; one commits it, the other's
    conditional claim finds the row taken and commits nothing. Same for the 24 h notice."""
    a, _b = two_providers  # B never runs: nothing comes back
    clock = ManualClock()

    async def accept() -> float:
        async with _serving(a, clock) as svc:
            await _submit_and_accept(svc, a, "silenzio")
        return clock.now().timestamp()

    accepted = asyncio.run(accept())
    warning = _race(a, accepted + 12 * 3600 + 1, tmp_path, "warning")
    assert [r["due"] for r in warning] == [["warning"], ["warning"]]
    assert sorted(int(str(r["committed"])) for r in warning) == [0, 1]
    assert _events(a, "timeout-warning") == 1
    final = _race(a, accepted + 24 * 3600, tmp_path, "final")
    assert [r["due"] for r in final] == [["final"], ["final"]]
    assert sorted(int(str(r["committed"])) for r in final) == [0, 1]
    assert _events(a, "timeout") == 1
    conn = sqlite3.connect(a.root / "data" / "pecd.sqlite")
    try:  # exactly the two notices wait for delivery to the sender
        notices = conn.execute("SELECT count(*) FROM queue WHERE kind='deliver'"
                               " AND meta LIKE '%\"what\": \"timeout\"%'").fetchone()[0]
    finally:
        conn.close()
    assert notices == 2


def test_not_read_evidence_fires_once_with_two_processes(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    """The read deadline passes with two processes running: both build the not-read evidence,
    one commits it (the row's ``not_read`` set in the same transaction), the other nothing."""
    _a, b = two_providers
    conn = sqlite3.connect(b.root / "data" / "pecd.sqlite")
    with conn:
        conn.execute(
            "INSERT INTO reading (pec_id, recipient, sender, subject, ref_msgid, mailbox, file,"
            " delivered, deadline) VALUES ('race@a.test', 'bob@b.test', 'alice@a.test', 'x',"
            " '<x@client>', ?, '1.race.localhost', 1000.0, 2000.0)",
            (str(b.maildir("bob@b.test")),))
    conn.close()
    result = _race(b, 2001.0, tmp_path, "not-read", what="reading")
    assert [r["due"] for r in result] == [["not-read"], ["not-read"]]
    assert sorted(int(str(r["committed"])) for r in result) == [0, 1]
    assert _events(b, "not-read") == 1


class _serving:
    """A service on ``clock`` with listeners and runners, stopped on exit."""

    def __init__(self, p: ProviderDir, clock: ManualClock) -> None:
        self.svc = Service(p.config, clock=clock)

    async def __aenter__(self) -> Service:
        await self.svc.start()
        return self.svc

    async def __aexit__(self, *exc: object) -> None:
        await self.svc.stop()


def test_two_processes_on_one_sqlite_file_keep_one_ledger_chain(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    """Two processes appending at once: one chain, verified (the head is read in each write
    transaction, under SQLite's write lock; nothing keeps it in memory)."""
    a, _ = two_providers
    script = textwrap.dedent("""
        import asyncio, sys
        from pathlib import Path
        from pecd import config
        from pecd.service import Service
        from pecd.store.ledger import LedgerEvent

        async def main():
            svc = Service(config.load(Path(sys.argv[1])))
            for i in range(150):
                await svc.queue.record([LedgerEvent(event="test", detail={"n": i, "p": sys.argv[2]})])
            svc.cpu.shutdown()
            svc.db.close()
        asyncio.run(main())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(a.conf), str(i)]) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert _events(a, "test") == 300
    assert "ledger ok" in a.cli("ledger", "verify")
