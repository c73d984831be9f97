"""The fallback channel: what the recipient's provider does when a certified message is not read
by its deadline (``[fallback]``): POST a JSON event to a webhook (HMAC-SHA256 signed), run a
command with the event on stdin, write a print-and-post PDF to an outbox directory.

Receives ``fallback`` queue items, one per channel, that the reading point queues in the same
commit as the not-read evidence (so they are queued exactly once per message and recipient).
Each run is a ledger row: ``fallback`` when it worked, ``fallback-failed`` when it did not; a
failed run is retried with the relay's backoff and held after ``[relay] max_attempts``, never
dropped. Delivery is at least once: a crash between a successful run and its commit runs it
again, so every event carries an ``id`` for the receiver to recognise a repeat (the PDF's file
name is that id: a repeat overwrites the same file).

Trusts: its configuration (URL, secret, command, directory). Touches: the network (the webhook),
a child process, the print directory, and the Maildir file it prints (read only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from pecd.config import Config
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import Item, Outcome, backoff

log = logging.getLogger("pecd.fallback")

SIGNATURE_HEADER = "X-Pecd-Signature"  # "sha256=<hex HMAC of the body>"


class FallbackFailed(Exception):
    """This run did not work (timeout, HTTP error, exit status, unwritable directory)."""


def event(*, pec_id: str, recipient: str, sender: str, subject: str | None, delivered: float,
          deadline: float, evidence_id: str, provider: str, postal_address: str | None,
          mailbox: str, file: str) -> dict[str, object]:
    """The JSON event every channel gets; ``id`` is stable per message and recipient."""
    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")

    return {
        "event": "ContentHandoverFailure",
        "id": hashlib.sha256(f"{pec_id}\n{recipient.lower()}".encode()).hexdigest()[:32],
        "pec_id": pec_id, "recipient": recipient, "sender": sender, "subject": subject,
        "delivered": iso(delivered), "deadline": iso(deadline),
        "not_read_evidence": evidence_id, "provider": provider,
        "postal_address": postal_address, "mailbox": mailbox, "file": file,
    }


def public(ev: dict[str, object]) -> dict[str, object]:
    """What leaves the provider (webhook, command): not the mailbox's path on disk."""
    return {k: v for k, v in ev.items() if k not in ("mailbox", "file")}


def signature(body: bytes, secret: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, secret: bytes, timeout: float) -> int:
    """Blocking (run it in the executor): the status code of a 2xx answer, else raises."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: signature(body, secret),
        "User-Agent": "pecd-fallback"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        raise FallbackFailed(f"webhook answered {exc.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FallbackFailed(f"webhook unreachable: {reason}") from None


async def run_command(command: str, body: bytes, timeout: float) -> int:
    """``/bin/sh -c command`` with the event on stdin; exit status 0 or raises."""
    proc = await asyncio.create_subprocess_shell(
        command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    stdin, stderr = proc.stdin, proc.stderr

    async def feed() -> None:
        try:
            stdin.write(body)
            await stdin.drain()
        # the command exited without reading it all (its exit status tells how it went):
        # asyncio's loop says BrokenPipeError or ConnectionResetError, uvloop's RuntimeError
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass
        finally:
            with contextlib.suppress(RuntimeError):
                stdin.close()

    async def talk() -> bytes:
        _, err = await asyncio.gather(feed(), stderr.read())
        await proc.wait()
        return err

    try:
        err = await asyncio.wait_for(talk(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FallbackFailed(f"command timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-200:]
        raise FallbackFailed(f"command exited with {proc.returncode}: {tail}")
    return 0


class FallbackStage:
    """Runs one ``fallback`` item: the channel named in its meta."""

    def __init__(self, config: Config, read: Callable[[Item], bytes], cpu: Executor,
                 printer: Callable[[dict[str, object], Path], tuple[Path, list[str]]]
                 | None = None) -> None:
        self.config = config
        self.read = read
        self.cpu = cpu
        self.printer = printer

    async def handle(self, item: Item) -> Outcome:
        loop = asyncio.get_running_loop()
        ev = json.loads(await loop.run_in_executor(self.cpu, self.read, item))
        channel = str(item.meta.get("fallback", ""))
        fb = self.config.fallback
        body = json.dumps(public(ev), sort_keys=True).encode()
        base = LedgerEvent(event="fallback", msgid=str(ev["pec_id"]),
                           sender=str(ev["sender"]), recipients=(str(ev["recipient"]),),
                           subject=ev.get("subject") and str(ev["subject"]),
                           detail={"channel": channel, "id": ev["id"]})
        try:
            if channel == "webhook" and fb.webhook and fb.webhook_secret_file:
                secret = await loop.run_in_executor(self.cpu, _secret, fb.webhook_secret_file)
                status = await loop.run_in_executor(self.cpu, post, fb.webhook, body, secret,
                                                    fb.timeout)
                detail: dict[str, object] = {"status": status}
            elif channel == "command" and fb.command:
                await run_command(fb.command, body, fb.timeout)
                detail = {"exit": 0}
            elif channel == "print" and fb.print_dir and self.printer is not None:
                path, skipped = await loop.run_in_executor(self.cpu, self.printer, ev,
                                                           fb.print_dir)
                detail = {"file": path.name, "left_out": skipped}
            else:
                raise FallbackFailed(f"channel {channel!r} is not configured (any more)")
        except FallbackFailed as exc:
            return self._failed(item, base, str(exc))
        return Outcome(events=[replace(base, detail={**base.detail, **detail})])

    def _failed(self, item: Item, base: LedgerEvent, reason: str) -> Outcome:
        log.warning("fallback %s for %s failed: %s", base.detail.get("channel"), base.msgid,
                    reason)
        relay = self.config.relay
        event_ = replace(base, event="fallback-failed",
                         detail={**base.detail, "reason": reason, "attempt": item.attempts + 1})
        if item.attempts + 1 >= relay.max_attempts:
            return Outcome(state="hold", error=reason, events=[event_])
        delay = backoff(item.attempts, relay.retry_base, relay.retry_max, random.random())
        return Outcome(state="deferred", delay=delay, error=reason, events=[event_])


def _secret(path: Path) -> bytes:
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        raise FallbackFailed(f"cannot read webhook_secret_file: {exc.strerror}") from None
