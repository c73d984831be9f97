"""``pecd serve --workers N``: one supervising process and N worker processes on one machine.

Each worker is a full ``pecd serve`` of the same configuration with its listeners opened with
``SO_REUSEPORT``, so the kernel spreads connections across them; they share the database, and
the database (queue leases, conditional claims, the ledger's write lock) is what keeps them
from doing anything twice. The supervisor holds no listener, no database connection and no key:
it starts the workers, starts again one that dies (after a pause that doubles while workers
keep dying young, so a worker that cannot start does not spin), and on SIGTERM or SIGINT passes
SIGTERM on and waits for every worker's graceful stop. A worker whose supervisor dies gets
SIGTERM from the kernel (``PR_SET_PDEATHSIG``), so no worker outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

log = logging.getLogger("pecd.supervisor")

BACKOFF_FIRST = 0.5  # seconds before restarting a worker that died
BACKOFF_MAX = 30.0
STEADY_AFTER = 30.0  # a worker that ran this long was healthy: its next restart is quick again
STOP_GRACE = 60.0  # after SIGTERM, how long workers get before SIGKILL
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # no glibc: the worker may outlive a killed supervisor
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def backoff(failures: int) -> float:
    """The pause before the next start of a worker that died young ``failures`` times running."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1)))


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0  # consecutive deaths within STEADY_AFTER of their start
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Keeps ``count`` workers running ``command`` until :meth:`stop`."""

    def __init__(self, command: list[str], count: int) -> None:
        if count < 1:
            raise ValueError("--workers must be >= 1")
        self.command = command
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self.restarts = 0

    def _spawn(self, worker: Worker) -> None:
        env = dict(os.environ, PECD_WORKER=str(worker.index))
        worker.proc = subprocess.Popen(self.command, env=env, preexec_fn=_die_with_parent)
        worker.started = time.monotonic()
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def start(self) -> None:
        for worker in self.workers:
            self._spawn(worker)

    def step(self) -> None:
        """Notice dead workers and start again those whose pause is over."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.proc is not None and worker.restart_at is None:
                code = worker.proc.poll()
                if code is None:
                    continue
                worker.exits.append(code)
                worker.failures = 1 if now - worker.started >= STEADY_AFTER else worker.failures + 1
                worker.restart_at = now + backoff(worker.failures)
                log.warning("worker %d (pid %d) exited with %s; restarting in %.1f s",
                            worker.index, worker.proc.pid, code, worker.restart_at - now)
            if worker.restart_at is not None and now >= worker.restart_at and not self.stopping:
                self.restarts += 1
                self._spawn(worker)

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM to every worker, SIGKILL to those still running after ``grace``; 0 when all
        stopped cleanly."""
        self.stopping = True
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        status = 0
        for proc in running:
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                code = proc.wait()
            status = status or (0 if code == 0 else 1)
        return status


def worker_command(config_path: Path, verbose: bool) -> list[str]:
    """The command line of one worker: this same pecd, serving the same configuration."""
    return [sys.executable, "-m", "pecd", "-c", str(config_path), *(["-v"] if verbose else []),
            "serve", "--reuse-port"]


def run(config_path: Path, count: int, verbose: bool = False) -> int:
    """Supervise ``count`` workers until SIGTERM or SIGINT; the exit status."""
    supervisor = Supervisor(worker_command(config_path, verbose), count)
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supervisor.start()
    log.info("pecd supervising %d workers", count)
    while not stop:
        supervisor.step()
        time.sleep(0.1)
    log.info("stopping %d workers", count)
    return supervisor.stop()
