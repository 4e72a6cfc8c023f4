"""Bytes one stage produces while another consumes them, and how a consumer's retry gets
them again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from bgm import vocab
from bgm.v1 import common_pb2

T = TypeVar("T")


class Feed:
    """An append-only byte stream in memory: a producer writes at known offsets, one reader
    follows it.

    Writes are placed by offset, so a retried producer that starts over from zero adds
    only what was not there yet (for that only the count is needed, not the bytes).

    An hour of speech or music is hundreds of MiB, so the reader's pieces are dropped as it
    takes them and the producer waits while more than ``AHEAD_BYTES`` are unread. A feed
    cannot be read again once anything was dropped (``replayable``): a retried consumer
    starts the producer over instead (``Supply``).
    """

    AHEAD_BYTES = 16 * vocab.MIB

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.first = 0  # the index of pieces[0] among all pieces written (those before were dropped)
        self.size = 0
        self.unread = 0  # bytes written and not yet taken
        self.closed = False
        self.error: BaseException | None = None
        self._changed = asyncio.Condition()

    @property
    def replayable(self) -> bool:
        return self.first == 0

    async def write_at(self, offset: int, data: bytes) -> bytes:
        """Add what of ``data`` (placed at ``offset``) is new; that part is returned."""
        if self.closed:
            raise RuntimeError("write to a closed feed")
        if offset > self.size:
            raise ValueError(f"gap in the feed: write at {offset}, only {self.size} bytes so far")
        new = data[self.size - offset :]
        if new:
            async with self._changed:  # the reader's pace sets the producer's
                await self._changed.wait_for(lambda: self.unread < self.AHEAD_BYTES or self.closed)
                self.pieces.append(new)
                self.size += len(new)
                self.unread += len(new)
                self._changed.notify_all()
        return new

    async def close(self, error: BaseException | None = None) -> None:
        self.closed = True
        self.error = error
        async with self._changed:
            self._changed.notify_all()

    def discard(self) -> None:
        """Drop what the feed holds; nothing can be read after this."""
        self.first += len(self.pieces)
        self.pieces = []

    async def read(self, idle_s: float | None = None) -> AsyncIterator[bytes]:
        """Every piece from the start, as it arrives; raises the producer's error if it
        failed. With ``idle_s``, an empty piece whenever nothing came for that long (the
        caller keeps its own stream alive meanwhile)."""
        if not self.replayable:
            raise RuntimeError("this feed dropped what it held: start its producer over")
        index = 0  # pieces handed out so far

        def ready() -> bool:
            return index < self.first + len(self.pieces) or self.closed

        while True:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(ready), idle_s)
                except TimeoutError:
                    yield b""
                    continue
            if self.error is not None:
                raise self.error
            while index < self.first + len(self.pieces):
                piece = self.pieces.pop(0)
                index += 1
                self.first += 1
                self.unread -= len(piece)
                async with self._changed:
                    self._changed.notify_all()
                yield piece
            if self.closed and index == self.first + len(self.pieces):
                return


Produce = Callable[["Feed", "asyncio.Future[common_pb2.AudioFormat]"], Awaitable[None]]


class Supply:
    """A track the mix takes as a stage makes it (the separated speech, the score): the
    stage writes into a feed that drops what the mix took, so the gateway holds only what
    is in flight. A retried mix cannot replay that, so ``again`` starts the stage over into
    a new feed. ``produce(feed, fmt)`` writes the feed, closes it (with its error if it
    failed) and sets the track's format once known."""

    def __init__(self, produce: Produce) -> None:
        self._produce = produce
        self.fmt: asyncio.Future[common_pb2.AudioFormat] = asyncio.get_running_loop().create_future()
        self.feed = Feed()
        self.task = self._start()

    def _start(self) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._run(self.feed, self.fmt))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # the mix reports it
        return task

    async def _run(self, feed: Feed, fmt: asyncio.Future[common_pb2.AudioFormat]) -> None:
        try:
            await self._produce(feed, fmt)
        except Exception as exc:
            if not fmt.done():  # whoever waits for the format learns why there is none
                fmt.set_exception(exc)
                fmt.exception()  # read here too: nobody may be waiting
            raise

    def again(self) -> None:
        """Start over, unless nothing was taken yet."""
        if self.feed.replayable:
            return
        self.task.cancel()
        self.feed.discard()
        self.feed = Feed()
        if self.fmt.done() and self.fmt.exception() is not None:
            self.fmt = asyncio.get_running_loop().create_future()
        self.task = self._start()

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.feed.discard()


async def merge(*sources: AsyncIterator[T]) -> AsyncIterator[T]:
    """Items from every source as each becomes ready; the first source error is raised."""
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=16)
    done = object()

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await queue.put(item)
            await queue.put(done)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    pumps = [asyncio.ensure_future(pump(source)) for source in sources]
    try:
        finished = 0
        while finished < len(pumps):
            item = await queue.get()
            if item is done:
                finished += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def first_failure(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Wait for every task; as soon as one fails, raise its error (the caller cancels the rest).

    Where several have failed by then, the earliest in ``tasks`` wins, so the caller lists
    the stage most likely to be the cause first.
    """
    pending = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
