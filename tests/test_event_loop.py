"""The loop ``pecd serve`` runs on (pecd.edges.aio): uvloop unless PECD_EVENT_LOOP says asyncio."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from pecd.edges import aio


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_serve_runs_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PECD_EVENT_LOOP", raising=False)
    assert aio.run(_loop_type()) is uvloop.Loop


def test_the_standard_loop_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PECD_EVENT_LOOP", "asyncio")
    assert not issubclass(aio.run(_loop_type()), uvloop.Loop)


def test_an_unknown_loop_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PECD_EVENT_LOOP", "tokio")
    with pytest.raises(ValueError, match="PECD_EVENT_LOOP"):
        aio.loop_factory()
