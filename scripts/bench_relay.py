"""The benchmark's baselines without certification, each run as its own process on 127.0.0.1.

``sink``: an aiosmtpd server that accepts anything and appends ``<Message-ID> <time.time()>`` to a
log file per message, so the benchmark can see when each message arrived. It stores nothing else.

``relay``: a plain store-and-forward relay on the same stack as pecd: an aiosmtpd submission
listener (STARTTLS + AUTH PLAIN/LOGIN, ``250`` only after the message is written and fsynced to a
spool file), then aiosmtplib workers that forward over persistent connections to the sink and
remove the spool file after the sink's ``250``. No signatures, no timestamps, no database.

Both stop on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import signal
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from pecd.store import durable


def message_id(data: bytes) -> str:
    end = data.find(b"\r\n\r\n")
    for line in data[: end if end >= 0 else 8192].split(b"\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("latin-1")
    return "-"


class SinkHandler:
    def __init__(self, log: Path) -> None:
        self.out = open(log, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        self.out.write(f"{message_id(data)} {time.time():.6f}\n")
        return "250 2.0.0 Ok: stored nowhere"


class RelayHandler:
    def __init__(self, spool: Path, sink_port: int, workers: int) -> None:
        self.spool = spool
        self.spool.mkdir(parents=True, exist_ok=True)
        self.sink_port = sink_port
        self.pending: asyncio.Queue[tuple[Path, str, list[str], bytes]] = asyncio.Queue()
        self.workers = [asyncio.create_task(self._forward()) for _ in range(workers)]

    def _store(self, data: bytes) -> Path:
        path = self.spool / uuid.uuid4().hex
        durable.write_synced(path, data)  # the same fsynced write as pecd's spool
        return path

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        path = await asyncio.get_running_loop().run_in_executor(None, self._store, data)
        await self.pending.put((path, str(envelope.mail_from), list(envelope.rcpt_tos), data))
        return f"250 2.0.0 Ok: queued as {path.name}"

    async def _forward(self) -> None:
        client: aiosmtplib.SMTP | None = None
        while True:
            path, mail_from, rcpts, data = await self.pending.get()
            for attempt in range(5):
                try:
                    if client is None or not client.is_connected:
                        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.sink_port,
                                                 start_tls=False, timeout=60)
                        await client.connect()
                    await client.sendmail(mail_from, rcpts, data)
                    break
                except (aiosmtplib.SMTPException, OSError) as exc:
                    print(f"relay: attempt {attempt + 1} failed: {exc}", flush=True)
                    client = None
                    await asyncio.sleep(0.5)
            path.unlink(missing_ok=True)


class Authenticator:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            expected = self.users.get(login)
            if expected is not None and hmac.compare_digest(expected, password):
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    handler: Any
    if args.mode == "sink":
        handler = SinkHandler(args.log)

        def factory() -> SMTP:
            return SMTP(handler, hostname="sink.localhost", auth_required=False,
                        data_size_limit=64 * 1024 * 1024, loop=loop)
    else:
        handler = RelayHandler(args.spool, args.sink_port, args.workers)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
        users = dict(u.split(":", 1) for u in args.user)
        auth = Authenticator(users)

        def factory() -> SMTP:
            return SMTP(handler, hostname="relay.localhost", tls_context=tls, require_starttls=True,
                        auth_required=True, auth_require_tls=True, authenticator=auth,
                        data_size_limit=64 * 1024 * 1024, loop=loop)

    server = await loop.create_server(factory, "127.0.0.1", args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{args.mode} listening on 127.0.0.1:{args.port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description="pecd benchmark baselines: sink and plain relay")
    parser.add_argument("mode", choices=["sink", "relay"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, help="sink: arrival log")
    parser.add_argument("--spool", type=Path, help="relay: spool directory")
    parser.add_argument("--sink-port", type=int, help="relay: where to forward")
    parser.add_argument("--workers", type=int, default=4, help="relay: forwarding connections")
    parser.add_argument("--cert", help="relay: TLS certificate (PEM)")
    parser.add_argument("--key", help="relay: TLS key (PEM)")
    parser.add_argument("--user", action="append", default=[], help="relay: login:password")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
