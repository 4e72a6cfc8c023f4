"""Bytes one stage produces while another consumes them, replayable for retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bgm import audio, flac, vocab

T = TypeVar("T")
# A feed's bytes as FLAC takes them: 16-bit words (the rate is only a label).
WORDS = audio.audio_format(vocab.SEPARATION_RATE, 1, audio.PCM_S16LE)


class Feed:
    """An append-only byte stream: a producer writes at known offsets, readers follow it.

    Writes are placed by offset, so a retried producer that starts over from zero adds
    only what was not there yet; every reader starts from the beginning, so a retried
    consumer replays everything.

    With a ``path`` the bytes are kept on disk rather than in memory, so an hour of
    separated speech costs disk, not memory: as FLAC segments of SEGMENT_BYTES beside
    ``path`` (16-bit words, lossless whatever the bytes are; separated speech takes about
    a third of its raw size), the bytes after the last segment in memory. Readers then
    get pieces of at most ``READ_BYTES``.
    """

    READ_BYTES = vocab.MIB
    SEGMENT_BYTES = 8 * vocab.MIB  # 87 s of mono 16-bit speech at 48 kHz

    def __init__(self, path: Path | None = None) -> None:
        self.pieces: list[bytes] = []
        self.path = path
        self.segments: list[flac.FlacPcm] = []  # with a path: each SEGMENT_BYTES of the stream
        self.tail = bytearray()  # with a path: what follows the segments
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
            if self.path is not None:
                self.tail += new
            else:
                self.pieces.append(new)
            self.size += len(new)
            async with self._changed:
                self._changed.notify_all()
            while self.path is not None and len(self.tail) >= self.SEGMENT_BYTES:
                segment = await asyncio.to_thread(self._seal)
                self.segments.append(segment)  # and out of the tail in the same step: readers see one or the other
                del self.tail[: self.SEGMENT_BYTES]

    def _seal(self) -> flac.FlacPcm:
        """The tail's first SEGMENT_BYTES as a FLAC segment, copied a piece at a time (the
        loop only appends to the tail meanwhile): a copy of the whole segment at once, and
        the copies of that copy, raised the gateway's peak by some 30 MiB each time."""
        assert self.path is not None
        segment = flac.FlacPcm(self.path.with_name(f"{self.path.name}.{len(self.segments)}.flac"), WORDS)
        for lo in range(0, self.SEGMENT_BYTES, self.READ_BYTES):
            segment.write(bytes(self.tail[lo : min(self.SEGMENT_BYTES, lo + self.READ_BYTES)]))
        segment.finish()
        return segment

    async def close(self, error: BaseException | None = None) -> None:
        self.closed = True
        self.error = error
        async with self._changed:
            self._changed.notify_all()

    def discard(self) -> None:
        """Drop what the feed holds (its files too); nothing can be read after this."""
        self.pieces = []
        for segment in self.segments:
            segment.close()
        self.segments = []
        self.tail = bytearray()

    async def _read_from(self, position: int) -> bytes:
        sealed = len(self.segments) * self.SEGMENT_BYTES
        if position >= sealed:
            return bytes(self.tail[position - sealed : position - sealed + self.READ_BYTES])
        segment = self.segments[position // self.SEGMENT_BYTES]
        lo = position % self.SEGMENT_BYTES // 2
        hi = min(lo + self.READ_BYTES // 2, self.SEGMENT_BYTES // 2)
        words = await asyncio.to_thread(segment.read, lo, hi)
        if hi == self.SEGMENT_BYTES // 2:  # read to its end: no file handle held per segment of an hour
            segment.release()
        return words.astype("<i2", copy=False).tobytes()

    async def read(self) -> AsyncIterator[bytes]:
        """Every piece from the start, as it arrives; raises the producer's error if it failed."""
        index = 0  # pieces (in memory) or bytes (on disk) handed out so far

        def ready() -> bool:
            return index < (self.size if self.path is not None else len(self.pieces)) or self.closed

        while True:
            async with self._changed:
                await self._changed.wait_for(ready)
            if self.error is not None:
                raise self.error
            if self.path is not None:
                while index < self.size:
                    piece = await self._read_from(index)
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
