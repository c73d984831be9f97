"""The benchmark's load generator: C persistent SMTP sessions (STARTTLS + AUTH PLAIN) that submit
pre-built messages to 127.0.0.1 and time each transaction.

A separate process, so its CPU is measured apart from the servers'. It speaks SMTP itself over
asyncio streams (no PIPELINING, one command and one reply at a time, as smtplib and aiosmtplib
do) because that costs the client the least CPU per message, and on a 2-core machine every cycle
the client burns is taken from the servers. With ``--rate`` the load is open-loop: message i is
due at ``start + i / rate`` whichever session sends it.

Input: a JSON job on stdin (see :class:`Job`); the message template's ``@@N@@`` becomes the
message's index, so each has its own Message-ID. Output: one JSON document on stdout with a record
per message (times from ``time.time()``) and the client's own CPU seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK = b"@@N@@"


class SMTPError(Exception):
    """The server answered something the benchmark did not expect."""


@dataclass
class Job:
    port: int
    ca: str | None  # CA file to verify the server with; STARTTLS skipped when None
    users: list[tuple[str, str]]  # (login, password) per session; login is also MAIL FROM
    rcpt: str
    template: str  # message file (CRLF, no line starting with '.'); MARK becomes the index
    count: int  # at least this many messages...
    concurrency: int
    min_seconds: float = 0.0  # ...and keep sending until this long has passed since the first
    max_count: int = 1_000_000  # never more than this many, whatever min_seconds says
    rate: float = 0.0  # messages per second across all sessions; 0 = as fast as possible
    auth: bool = True
    timeout: float = 120.0  # per reply
    deadline: float = 600.0  # whole job
    # when set: once every session has logged in, create ready_file and wait for go_file (so
    # the caller can measure what the messages cost apart from what the logins cost)
    ready_file: str | None = None
    go_file: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                raise SMTPError("connection closed by the server")
            lines.append(line.decode("latin-1").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def command(self, line: str, expect: int) -> str:
        self.writer.write(line.encode() + b"\r\n")
        code, text = await self.reply()
        if code != expect:
            raise SMTPError(f"{line.split(' ')[0]}: expected {expect}, got {text!r}")
        return text


async def open_session(job: Job, login: str, password: str) -> Session:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", job.port), 30)
    s = Session(reader, writer, job.timeout)
    code, text = await s.reply()
    if code != 220:
        raise SMTPError(f"greeting: {text!r}")
    await s.command("EHLO bench.client", 250)
    if job.ca is not None:
        await s.command("STARTTLS", 220)
        ctx = ssl.create_default_context(cafile=job.ca)
        await writer.start_tls(ctx, server_hostname="localhost")
        await s.command("EHLO bench.client", 250)
    if job.auth:
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        await s.command(f"AUTH PLAIN {token}", 235)
    return s


async def run(job: Job) -> dict[str, Any]:
    with open(job.template, "rb") as f:
        template = f.read()
    next_index = 0
    errors: list[str] = []
    start = time.time()
    opened = 0
    go = asyncio.Event()
    if job.ready_file is None:
        go.set()

    async def wait_for_go() -> None:
        assert job.ready_file is not None and job.go_file is not None
        Path(job.ready_file).touch()
        while not Path(job.go_file).exists():
            await asyncio.sleep(0.02)
        go.set()

    def more(i: int) -> bool:
        """Another message is due: fewer than ``count`` sent, or ``min_seconds`` not yet over
        (so a phase is long enough to be stable whatever the rate), within ``max_count``."""
        if i >= job.max_count:
            return False
        return i < job.count or time.time() - start < job.min_seconds

    async def worker(n: int) -> None:
        nonlocal next_index, opened, start
        login, password = job.users[n % len(job.users)]
        s = await open_session(job, login, password)
        opened += 1
        if not go.is_set() and opened == job.concurrency:
            await wait_for_go()
            start = time.time()
        await go.wait()
        try:
            while more(next_index):
                i = next_index
                next_index += 1
                data = template.replace(MARK, str(i).encode())
                if job.rate > 0:
                    delay = start + i / job.rate - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t_start = time.time()
                await s.command(f"MAIL FROM:<{login}>", 250)
                await s.command(f"RCPT TO:<{job.rcpt}>", 250)
                await s.command("DATA", 354)
                s.writer.write(data)
                s.writer.write(b".\r\n")
                await s.writer.drain()
                t_end = time.time()
                code, text = await s.reply()
                t_250 = time.time()
                if code != 250:
                    raise SMTPError(f"DATA: {text!r}")
                job.records.append({"i": i, "msgid": _message_id(data), "start": t_start, "data_end": t_end,
                                    "acked": t_250, "session": n})
            await s.command("QUIT", 221)
        finally:
            s.writer.close()

    async def guarded(n: int) -> None:
        try:
            await worker(n)
        except (SMTPError, OSError, TimeoutError, ssl.SSLError) as exc:
            errors.append(f"session {n}: {type(exc).__name__}: {exc}")

    try:
        await asyncio.wait_for(
            asyncio.gather(*(guarded(n) for n in range(job.concurrency))), job.deadline)
    except TimeoutError:
        errors.append(f"deadline of {job.deadline:.0f} s reached")
    cpu = os.times()
    return {"records": job.records, "errors": errors, "started": start, "ended": time.time(),
            "cpu": cpu.user + cpu.system}


def _message_id(data: bytes) -> str:
    head = data[: data.find(b"\r\n\r\n")]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise ValueError("message without Message-ID")


def main() -> None:
    spec = json.load(sys.stdin)
    spec["users"] = [tuple(u) for u in spec["users"]]
    result = asyncio.run(run(Job(**spec)))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
