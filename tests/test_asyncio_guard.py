"""The guard against blocking the event loop (tests/asyncio_guard.py) catches a handler
that blocks, and lets one that hands its work to a thread pass."""

from __future__ import annotations

import asyncio
import logging
import time

from tests.asyncio_guard import SLOW, GcPauses, SlowCallbacks, guard


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


def test_a_garbage_collection_pause_is_not_counted_against_the_handler():
    clock = [100.0]
    pauses = GcPauses(clock=lambda: clock[0])
    slow = SlowCallbacks(pauses)

    def report(seconds: float) -> None:
        slow.emit(logging.LogRecord("asyncio", logging.WARNING, __file__, 0,
                                    f"Executing <Handle h()> took {seconds:.3f} seconds", None, None))

    pauses("start", {})
    clock[0] = 100.6
    pauses("stop", {})  # a 0.6 s collection
    clock[0] = 100.7
    report(0.7)  # 0.1 s of the handler's own: not reported
    assert slow.take() == []
    clock[0] = 105.0
    report(0.7)  # no collection during this one
    assert len(slow.take()) == 1
