"""Connection flood on the HTTP listener: one client address opens more connections than
``[limits] max_connections_per_address`` allows (as against the SMTP listeners) and holds them.
The connections over the cap get ``429`` with ``Retry-After`` and are closed; the ones under it
keep working, a slot freed is usable again, and ``/metrics`` counts the refusals. The per-source
login throttle is the SMTP one (tests/test_attack_http_bruteforce.py). Real sockets; the time
bound only stops a broken test from hanging."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .attack_support import serving, set_limits, single_provider
from .conftest import ProviderDir

GUARD = 15.0
CAP = 3


def _request(sock: socket.socket, path: str = "/healthz") -> tuple[int, dict[str, str], bytes]:
    """One keep-alive GET on an open socket; the status, headers and body of its answer."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(fields.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), fields, body


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=GUARD)


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_attack_http_connection_flood_over_the_cap_gets_429_with_retry_after(tmp_path: Path) -> None:
    a: ProviderDir = single_provider(tmp_path)
    set_limits(a, max_connections_per_address=CAP)
    with serving(a, runners=False) as (svc,):
        port = svc.ports.http
        held = [_connect(port) for _ in range(CAP)]
        try:
            for sock in held:  # each is served, and stays open (keep-alive)
                assert _request(sock)[0] == 200
            refused = []
            for _ in range(5):  # the flood: each one over the cap
                sock = _connect(port)
                status, fields, body = _request(sock)
                assert status == 429, body
                assert int(fields["retry-after"]) >= 1
                assert fields["content-type"].startswith("application/problem+json")
                assert json.loads(body)["check"] == "too-many-connections"
                assert _closed_by_server(sock)
                refused.append(sock)
            for sock in refused:
                sock.close()
            for sock in held:  # the connections under the cap were not disturbed
                assert _request(sock)[0] == 200
            held.pop().close()  # a slot frees: a new connection is served again
            deadline = time.monotonic() + GUARD
            while True:
                sock = _connect(port)
                status, _fields, body = _request(sock, "/metrics")
                if status == 200:
                    break
                sock.close()
                assert time.monotonic() < deadline, "the freed slot was never reused"
            held.append(sock)
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            refusals = families["pecd_http_connections_refused"].samples
            assert sum(s.value for s in refusals if s.name.endswith("_total")) >= 5
        finally:
            for sock in held:
                sock.close()


def test_attack_http_connection_flood_of_silent_connections_is_capped(tmp_path: Path) -> None:
    """Connections that never send a request (slowloris-like) still count against the cap, and
    one over it is closed by the server without an answer ever being asked for."""
    a: ProviderDir = single_provider(tmp_path)
    set_limits(a, max_connections_per_address=CAP)
    with serving(a, runners=False) as (svc,):
        port = svc.ports.http
        held = [_connect(port) for _ in range(CAP)]
        try:
            assert _request(held[0])[0] == 200  # the listener has taken them in
            extra = _connect(port)
            assert _closed_by_server(extra)  # closed after a few idle seconds, within GUARD
            extra.close()
        finally:
            for sock in held:
                sock.close()
