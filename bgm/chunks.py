"""Splitting media into chunks and reassembling "config first, then chunks" streams.

Media never travels in one message: senders cut it into CHUNK_BYTES pieces, receivers
spool what arrives to a temporary file (memory stays bounded) and enforce a size limit.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bgm import scratch, vocab
from bgm.errors import IdleStream, InvalidInput
from bgm.settings import ServerSettings

MIN_CHUNK_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
CHUNK_BYTES = 512 * 1024


def iter_chunks(data: bytes | memoryview, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Yield ``data`` in pieces of ``size`` bytes (the last may be shorter)."""
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def iter_file_chunks(path: str | os.PathLike[str], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(size):
            yield piece


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class Spool:
    """A temporary file that collects streamed bytes; removed by ``close`` (or ``with``)."""

    limit: int
    what: str = "input"
    dir: str | None = None
    suffix: str = ""
    size: int = 0
    path: Path = field(init=False)
    _file: BinaryIO = field(init=False)
    _too_large: InvalidInput | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix=scratch.prefix(), suffix=self.suffix, dir=self.dir or None)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")

    def cap(self, limit: int, error: InvalidInput) -> None:
        """Lower the limit (to what a duration limit allows, say), with its own error."""
        if limit < self.limit:
            self.limit, self._too_large = limit, error

    def reserve(self, count: int) -> None:
        """Count ``count`` more bytes against the limit (``write`` does; so do bytes the
        caller keeps elsewhere, in another form)."""
        if self.size + count > self.limit:
            if self._too_large is not None:
                raise self._too_large
            raise InvalidInput(
                f"{self.what} is larger than the limit of {_mib(self.limit)}; send a shorter file "
                "or raise the server's MAX_INPUT_BYTES setting"
            )
        self.size += count

    def write(self, data: bytes) -> None:
        self.reserve(len(data))
        self._file.write(data)

    def flush(self) -> None:
        """What was written so far, on disk for a reader of ``path`` (a track read as it arrives)."""
        if not self._file.closed:
            self._file.flush()

    def finish(self) -> Path:
        if not self._file.closed:
            self._file.close()
        return self.path

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class StreamLimits:
    """How long a client may leave a stream silent, and how long its whole upload may take.

    ``prefix`` names the settings (``BGM_STT``) in the error a dropped client gets.
    """

    idle_s: float = 60.0
    total_s: float = 3600.0
    prefix: str = "BGM"

    @classmethod
    def of(cls, settings: ServerSettings, service: vocab.Service) -> StreamLimits:
        return cls(settings.idle_timeout_s, settings.upload_timeout_s, service.env_prefix)


async def paced(requests: AsyncIterable[Any], limits: StreamLimits) -> AsyncIterator[Any]:
    """The messages of ``requests``; IdleStream when the client goes quiet or takes too long.

    A client that opens a stream and sends nothing would otherwise hold what the stream
    holds (a spool, a temp folder, an upload slot) for as long as it likes.
    """
    iterator = aiter(requests)
    deadline = time.monotonic() + limits.total_s
    while True:
        wait = min(limits.idle_s, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(0.0, wait)):
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise IdleStream(f"the upload took longer than {limits.total_s:g} s "
                                 f"({limits.prefix}_UPLOAD_TIMEOUT_S); send less, or faster") from None
            raise IdleStream(f"nothing was sent for {limits.idle_s:g} s ({limits.prefix}_IDLE_TIMEOUT_S); "
                             "the stream was dropped") from None
        yield message


async def read_config(
    requests: AsyncIterable[Any], config_field: str, payload_field: str, limits: StreamLimits | None = None,
) -> tuple[Any, Any]:
    """Read the first message of a stream, which must carry ``config_field``.

    Returns the config and the iterator positioned after it (paced by ``limits`` when given).
    """
    iterator = aiter(paced(requests, limits) if limits is not None else requests)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        raise InvalidInput(f"empty stream: send a '{config_field}' message, then '{payload_field}' chunks") from None
    if first.WhichOneof("payload") != config_field:
        raise InvalidInput(
            f"the stream must start with a '{config_field}' message, before any '{payload_field}' chunk"
        )
    return getattr(first, config_field), iterator


async def spool_payload(
    iterator: AsyncIterable[Any],
    spool: Spool,
    config_field: str,
    payload_field: str,
) -> int:
    """Write every ``payload_field`` chunk of the rest of the stream into ``spool``."""
    count = 0
    async for data in payloads(iterator, config_field, payload_field):
        spool.write(data)
        count += 1
    return count


async def payloads(iterator: AsyncIterable[Any], config_field: str, payload_field: str) -> AsyncIterator[bytes]:
    """The ``payload_field`` chunks of the rest of the stream; any other message is refused."""
    async for message in iterator:
        kind = message.WhichOneof("payload")
        if kind == config_field:
            raise InvalidInput(f"'{config_field}' was sent twice; send it once, as the first message")
        if kind != payload_field:
            raise InvalidInput(f"expected '{payload_field}' chunks after the '{config_field}' message")
        yield getattr(message, payload_field)
