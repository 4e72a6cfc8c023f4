"""The rule "an async def only awaits", checked: every test loop runs in asyncio's debug mode,
which reports any callback that holds the loop longer than SLOW_CALLBACK_S, and the test
session fails when one is reported.

Embedded, the CLI, the gateway and all four services share one loop, so one blocking call
freezes every server, health checks included. Array math, subprocesses, model loads and
whole-file I/O belong in ``asyncio.to_thread`` or ``bgm.threads.iterate_in_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import threading

SLOW_CALLBACK_S = 0.25


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing <...> took N seconds" reports."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.reports: list[str] = []
        self.mutex = threading.Lock()  # not "lock": logging.Handler holds its own while emitting

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing ") and " took " in message:
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
