"""Password guessing spread over the nodes of one provider: each node alone sees too few
failures to refuse anything, but the counts are shared through the database, so the limits
(and the durable account lock) trip as if there were one node.

Two real ``pecd serve`` processes of one provider (same data directory, hence the same
database), each on its own ports so the test picks which node each guess goes to.
"""

from __future__ import annotations

import base64
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ProviderDir, client_tls, free_port, make_provider
from .pechelpers import configure, ledger


def _second_node(p: ProviderDir) -> Path:
    """A second node's configuration: the same file but its own ports (same data_dir)."""
    text = p.conf.read_text()
    for key in ("submission_port", "smtps_port", "inbound_port"):
        text = re.sub(rf"^{key} = \d+", f"{key} = {free_port()}", text, flags=re.M)
    text = re.sub(r"^port = \d+", f"port = {free_port()}", text, flags=re.M)
    conf = p.root / "node2.toml"
    conf.write_text(text)
    return conf


def _port(conf: Path) -> int:
    m = re.search(r"^submission_port = (\d+)", conf.read_text(), flags=re.M)
    assert m
    return int(m[1])


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[ProviderDir, int, int]]:
    p = make_provider(tmp_path, "a.test", tmp_path / "ca")
    configure(p, "limits", auth_failures_per_source=50, auth_failures_per_account=50,
              auth_failures_per_address=4, lock_after_failures=3)
    p.add_user("alice@a.test", "alice-secret")
    p.add_user("dave@a.test", "dave-secret")
    confs = [p.conf, _second_node(p)]
    logs = [tmp_path / f"node{i}.log" for i in (1, 2)]
    procs = []
    for conf, log in zip(confs, logs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "pecd", "-c", str(conf), "serve"],
                                          stdout=out, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 60
        while not all("pecd serving" in log.read_text() for log in logs):
            assert all(proc.poll() is None for proc in procs), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, "nodes did not start"
            time.sleep(0.05)
        yield p, _port(confs[0]), _port(confs[1])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)


def _auth(p: ProviderDir, port: int, user: str, password: str, source: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.starttls(context=client_tls(p.ca))
        s.ehlo()
        code, _ = s.docmd("AUTH", "PLAIN " + _plain(user, password))
        return code


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_attack_bruteforce_across_nodes_trips_the_address_limit(
        nodes: tuple[ProviderDir, int, int]) -> None:
    p, one, two = nodes
    source = "127.0.0.7"
    # four guesses at four accounts, two on each node: each node saw only two
    for port, name in ((one, "x1"), (two, "x2"), (one, "x3"), (two, "x4")):
        assert _auth(p, port, f"{name}@a.test", "guess", source) == 535
    # the limit is 4 per address across the provider: the right password is refused, on both
    assert _auth(p, one, "alice@a.test", "alice-secret", source) == 454
    assert _auth(p, two, "alice@a.test", "alice-secret", source) == 454
    # another address is not affected
    assert _auth(p, two, "alice@a.test", "alice-secret", "127.0.0.8") == 235


def test_attack_bruteforce_across_nodes_locks_the_account(nodes: tuple[ProviderDir, int, int]) -> None:
    p, one, two = nodes
    for port, source in ((one, "127.0.0.11"), (two, "127.0.0.12"), (one, "127.0.0.13")):
        assert _auth(p, port, "dave@a.test", "wrong", source) == 535
    # three failures in a row over two nodes: locked on both, even with the right password
    assert _auth(p, two, "dave@a.test", "dave-secret", "127.0.0.14") == 535
    assert _auth(p, one, "dave@a.test", "dave-secret", "127.0.0.15") == 535
    (locked,) = ledger(p, "account-locked")  # one lock, written by the node that saw the third
    assert locked["sender"] == "dave@a.test" and locked["detail"]["failures"] == 3
