"""The guard against blocking the event loop (tests/asyncio_guard.py) catches a handler
that blocks, and lets one that hands its work to a thread pass."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
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


def native_work() -> list[int]:
    """Sorting integers is native code that keeps the interpreter lock throughout (~0.5 s)."""
    numbers = list(range(1_500_000))
    random.Random(0).shuffle(numbers)
    return numbers


def test_native_code_on_the_loop_is_reported():
    numbers = native_work()

    async def native_handler():
        started = time.perf_counter()
        sorted(numbers)
        assert time.perf_counter() - started > 0.3, "this machine sorts too fast for the test"

    reports = run_guarded(native_handler)
    assert len(reports) == 1 and "native_handler" in reports[0]


def test_waiting_while_another_thread_holds_the_interpreter_lock_is_not_counted():
    numbers = native_work()
    held = []

    def loader() -> None:  # like native code loading a model in a worker thread
        started = time.perf_counter()
        sorted(numbers)
        held.append(time.perf_counter() - started)

    async def stalled_handler():
        worker = threading.Thread(target=loader)
        worker.start()
        time.sleep(0.01)  # hands over the lock; the handler then waits to get it back
        await asyncio.to_thread(worker.join)

    assert run_guarded(stalled_handler) == []
    assert held[0] > 0.3, "this machine sorts too fast for the test"
