"""Bytes one stage produces while another consumes them, replayable for retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bgm import vocab

T = TypeVar("T")


class Feed:
    """An append-only byte stream: a producer writes at known offsets, readers follow it.

    Writes are placed by offset, so a retried producer that starts over from zero adds
    only what was not there yet; every reader starts from the beginning, so a retried
    consumer replays everything.

    With a ``path`` the bytes are kept in that file rather than in memory, so an hour of
    separated speech costs disk, not memory; readers then get pieces of at most
    ``READ_BYTES``.
    """

    READ_BYTES = vocab.MIB

    def __init__(self, path: Path | None = None) -> None:
        self.pieces: list[bytes] = []
        self.path = path
        self._file = open(path, "w+b") if path is not None else None  # noqa: SIM115 - closed by discard()
        self.size = 0
        self.closed = False
        self.error: BaseException | None = None
        self._changed = asyncio.Condition()

    async def write_at(self, offset: int, data: bytes) -> None:
        if self.closed:
            raise RuntimeError("write to a closed feed")
        if offset > self.size:
            raise ValueError(f"gap in the feed: write at {offset}, only {self.size} bytes so far")
        new = data[self.size - offset :]
        if new:
            if self._file is not None:
                self._file.seek(self.size)
                self._file.write(new)
                self._file.flush()
            else:
                self.pieces.append(new)
            self.size += len(new)
            async with self._changed:
                self._changed.notify_all()

    async def close(self, error: BaseException | None = None) -> None:
        self.closed = True
        self.error = error
        async with self._changed:
            self._changed.notify_all()

    def discard(self) -> None:
        """Drop what the feed holds (its file too); nothing can be read after this."""
        self.pieces = []
        if self._file is not None:
            self._file.close()
            self._file = None
            assert self.path is not None
            self.path.unlink(missing_ok=True)

    def _read_from(self, position: int) -> bytes:
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            f.seek(position)
            return f.read(min(self.READ_BYTES, self.size - position))

    async def read(self) -> AsyncIterator[bytes]:
        """Every piece from the start, as it arrives; raises the producer's error if it failed."""
        index = 0  # pieces (in memory) or bytes (in a file) handed out so far

        def ready() -> bool:
            return index < (self.size if self.path is not None else len(self.pieces)) or self.closed

        while True:
            async with self._changed:
                await self._changed.wait_for(ready)
            if self.error is not None:
                raise self.error
            if self.path is not None:
                while index < self.size:
                    piece = self._read_from(index)
                    index += len(piece)
                    yield piece
                if self.closed and index == self.size:
                    return
                continue
            while index < len(self.pieces):
                index += 1
                yield self.pieces[index - 1]
            if self.closed and index == len(self.pieces):
                return


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
