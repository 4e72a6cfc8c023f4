"""Running blocking model code off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(
    make_iterator: Callable[[threading.Event], Iterator[T]], buffer: int = 8
) -> AsyncIterator[T]:
    """Drive a blocking iterator in a worker thread and yield its items here.

    ``make_iterator`` receives a cancel event that is set when the consumer stops early
    (client cancelled, error); long-running producers should check it between steps.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=buffer)
    cancel = threading.Event()

    def put(item: object) -> None:
        # Blocks the worker (not the loop) while the consumer is behind: back-pressure.
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def produce() -> None:
        try:
            for item in make_iterator(cancel):
                if cancel.is_set():
                    break
                put(item)
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            if not cancel.is_set():
                put(exc)

    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancel.set()
        # Unblock a producer stuck on a full queue, then wait for it to notice the flag.
        while not worker.done():
            while not queue.empty():
                queue.get_nowait()
            await asyncio.sleep(0.01)
