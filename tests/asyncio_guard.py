"""The rule "an async def only awaits", checked: every test loop runs in asyncio's debug mode,
which reports any callback that holds the loop longer than SLOW_CALLBACK_S, and the test
session fails when one is reported.

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
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in list(self.pauses))


GC_PAUSES = GcPauses()
gc.callbacks.append(GC_PAUSES)
_TOOK = re.compile(r" took (\d+(?:\.\d+)?) seconds")


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing <...> took N seconds" reports."""

    def __init__(self, pauses: GcPauses = GC_PAUSES) -> None:
        super().__init__(level=logging.WARNING)
        self.pauses = pauses
        self.reports: list[str] = []
        self.mutex = threading.Lock()  # not "lock": logging.Handler holds its own while emitting

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        took = _TOOK.search(message)
        if message.startswith("Executing ") and took:
            # asyncio reports right after the callback returns, so it ran over the last `took` s.
            seconds, now = float(took.group(1)), self.pauses.clock()
            if seconds - self.pauses.within(now - seconds - 0.01, now) < SLOW_CALLBACK_S:
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
