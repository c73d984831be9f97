"""The event loop ``pecd serve`` runs on.

uvloop (libuv, from PyPI wheels) by default: the benchmark put asyncio's own loop at a fifth of
the server's Python CPU per certified cycle (selector polling, callback handles, transport
writes), work uvloop does in C. ``PECD_EVENT_LOOP=asyncio`` selects the standard library's loop,
to compare the two or to rule the loop out when chasing a problem.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.SelectorEventLoop,  # the standard library's, whatever the policy
}


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The configured loop's constructor (``PECD_EVENT_LOOP``, default uvloop)."""
    name = os.environ.get("PECD_EVENT_LOOP", "uvloop")
    try:
        return LOOPS[name]
    except KeyError:
        raise ValueError(f"PECD_EVENT_LOOP={name!r}: expected one of {sorted(LOOPS)}") from None


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the configured loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
