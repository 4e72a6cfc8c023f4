"""Splitting media into chunks and reassembling "config first, then chunks" streams.

Media never travels in one message: senders cut it into CHUNK_BYTES pieces, receivers
spool what arrives to a temporary file (memory stays bounded) and enforce a size limit.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from bgm.errors import InvalidInput

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

    def __post_init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="bgm-", suffix=self.suffix, dir=self.dir or None)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            raise InvalidInput(
                f"{self.what} is larger than the limit of {_mib(self.limit)}; send a shorter file "
                "or raise the server's MAX_INPUT_BYTES setting"
            )
        self._file.write(data)
        self.size += len(data)

    def finish(self) -> Path:
        if not self._file.closed:
            self._file.close()
        return self.path

    def read_bytes(self) -> bytes:
        self.finish()
        return self.path.read_bytes()

    def open(self) -> IO[bytes]:
        self.finish()
        return open(self.path, "rb")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def read_config(
    requests: AsyncIterable[Any], config_field: str, payload_field: str
) -> tuple[Any, Any]:
    """Read the first message of a stream, which must carry ``config_field``.

    Returns the config and the iterator positioned after it.
    """
    iterator = aiter(requests)
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
    async for message in iterator:
        kind = message.WhichOneof("payload")
        if kind == config_field:
            raise InvalidInput(f"'{config_field}' was sent twice; send it once, as the first message")
        if kind != payload_field:
            raise InvalidInput(f"expected '{payload_field}' chunks after the '{config_field}' message")
        spool.write(getattr(message, payload_field))
        count += 1
    return count
