"""The guard against blocking the event loop (tests/asyncio_guard.py) catches a handler
that blocks, and lets one that hands its work to a thread pass."""

from __future__ import annotations

import asyncio
import time

from tests.asyncio_guard import SLOW, guard


def run_guarded(handler) -> list[str]:
    loop = guard(asyncio.new_event_loop())
    try:
        SLOW.take()
        loop.run_until_complete(handler())
        return SLOW.take()
    finally:
        loop.close()


def test_a_blocking_handler_is_reported():
    async def blocking_handler():
        time.sleep(0.4)  # the mistake: blocking work inside an async def

    reports = run_guarded(blocking_handler)
    assert len(reports) == 1 and "blocking_handler" in reports[0]


def test_work_handed_to_a_thread_is_not_reported():
    async def awaiting_handler():
        await asyncio.to_thread(time.sleep, 0.4)

    assert run_guarded(awaiting_handler) == []
