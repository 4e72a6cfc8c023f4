"""The rule "an async def only awaits", checked: every test loop runs in asyncio's debug mode,
which reports any callback that holds the loop longer than SLOW_CALLBACK_S, and the test
session fails when one is reported.

A callback can also be slow without being at fault: when another thread holds the
interpreter lock in native code (as a model load in a worker thread can) or the garbage
collector stops every thread, the loop waits for its turn. Such
time is not counted: it is time the loop's thread spent off the CPU while a watcher thread
also found the interpreter lock taken (GilStalls), or time the collector ran (GcPauses).

Embedded, the CLI, the gateway and all four services share one loop, so one blocking call
freezes every server, health checks included. Array math, subprocesses, model loads and
whole-file I/O belong in ``asyncio.to_thread`` or ``bgm.threads.iterate_in_thread``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import threading
import time
from collections import deque

SLOW_CALLBACK_S = 0.25


def overlap(intervals: deque[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``intervals`` inside [start, end] (copied first: another thread appends)."""
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in list(intervals))


class GcPauses:
    """When the garbage collector ran. A full collection of the test session's heap (torch,
    transformers, CTranslate2 and thousands of arrays loaded) stops every thread for up to
    about 0.7 s; that is not a handler blocking its loop, so it is not counted against one."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.started: float | None = None
        self.pauses: deque[tuple[float, float]] = deque(maxlen=1024)

    def __call__(self, phase: str, info: dict) -> None:
        now = self.clock()
        if phase == "start":
            self.started = now
        elif self.started is not None:
            self.pauses.append((self.started, now))
            self.started = None

    def within(self, start: float, end: float) -> float:
        """Seconds of collection inside [start, end]."""
        return overlap(self.pauses, start, end)


GC_PAUSES = GcPauses()
gc.callbacks.append(GC_PAUSES)


class GilStalls:
    """When some thread kept the interpreter lock for long. A watcher thread sleeps ``tick``
    seconds at a time; waking more than ``late`` seconds after it asked to, it was kept
    waiting for the lock (or the machine had no CPU free), so no other Python thread, the
    event loop's included, could run either."""

    def __init__(self, tick: float = 0.005, late: float = 0.03, clock=time.perf_counter) -> None:
        self.tick, self.late, self.clock = tick, late, clock
        self.stalls: deque[tuple[float, float]] = deque(maxlen=1024)
        self.thread: threading.Thread | None = None

    def start(self) -> GilStalls:
        self.thread = threading.Thread(target=self._watch, name="gil-stall-watcher", daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        last = self.clock()
        while True:
            time.sleep(self.tick)
            now = self.clock()
            if now - last > self.tick + self.late:
                self.stalls.append((last + self.tick, now))
            last = now

    def within(self, start: float, end: float) -> float:
        """Seconds of stall inside [start, end]."""
        return overlap(self.stalls, start, end)


class CallbackCpu(threading.local):
    """CPU seconds the loop's own thread spent in the callback that ran last on it: asyncio's
    slow-callback report comes right after the callback, on the same thread."""

    last: float = 0.0


CALLBACK_CPU = CallbackCpu()
_run_handle = asyncio.events.Handle._run


def _run_handle_timed(self: asyncio.Handle) -> None:
    started = time.thread_time()
    try:
        _run_handle(self)
    finally:
        CALLBACK_CPU.last = time.thread_time() - started


# asyncio times each callback (Handle._run) in debug mode; this adds the thread's CPU time.
asyncio.events.Handle._run = _run_handle_timed  # type: ignore[method-assign]
GIL_STALLS = GilStalls().start()
_TOOK = re.compile(r" took (\d+(?:\.\d+)?) seconds")


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing <...> took N seconds" reports."""

    def __init__(self, pauses: GcPauses = GC_PAUSES, stalls: GilStalls = GIL_STALLS,
                 cpu: CallbackCpu = CALLBACK_CPU) -> None:
        super().__init__(level=logging.WARNING)
        self.pauses, self.stalls, self.cpu = pauses, stalls, cpu
        self.reports: list[str] = []
        self.mutex = threading.Lock()  # not "lock": logging.Handler holds its own while emitting

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        took = _TOOK.search(message)
        if message.startswith("Executing ") and took:
            # asyncio reports right after the callback returns, so it ran over the last `took` s.
            seconds, now = float(took.group(1)), self.pauses.clock()
            start = now - seconds - 0.01
            off_cpu = max(0.0, seconds - self.cpu.last)  # waiting, on the lock or on anything
            excused = max(self.pauses.within(start, now), min(off_cpu, self.stalls.within(start, now)))
            if seconds - excused < SLOW_CALLBACK_S:
                return
            with self.mutex:
                self.reports.append(message)

    def take(self) -> list[str]:
        with self.mutex:
            reports, self.reports = self.reports, []
        return reports


SLOW = SlowCallbacks()
logging.getLogger("asyncio").addHandler(SLOW)


def guard(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """Debug mode on ``loop``, reporting callbacks slower than SLOW_CALLBACK_S."""
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S
    return loop
