"""16-bit PCM kept on disk as FLAC: the same samples in about half the bytes for music and
a third for separated speech, so the copies a long remix keeps (the score, the speech)
cost far less temp disk. An hour of the score is 659 MiB raw and about 310 MiB here;
encoding it takes about 8 s and reading it back 6 s on one core.

Bytes arrive in pieces of any size (a stream's chunks need not end on a frame); they are
encoded a batch at a time, off the event loop for callers that await ``append``.
``FlacSegments`` keeps a track that must be read while it still arrives (the mixer's VAD
follows the speech as it lands) as a row of FLAC files.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile

from bgm import audio, vocab
from bgm.chunks import CHUNK_BYTES
from bgm.v1 import common_pb2

BATCH_BYTES = 4 * vocab.MIB  # raw bytes buffered before they are encoded (about 50 ms of work)


def fits(fmt: common_pb2.AudioFormat) -> bool:
    """Whether PCM in ``fmt`` is kept losslessly here (FLAC holds integers: 16-bit only)."""
    return fmt.encoding == audio.PCM_S16LE and 1 <= fmt.channels <= audio.MAX_CHANNELS


class FlacPcm:
    """Raw 16-bit little-endian PCM written in pieces, kept as FLAC, read back at offsets.

    ``size`` counts the raw bytes taken (what a byte limit applies to); ``frames`` the
    samples per channel once ``finish`` has run. Reads may come from several threads.
    """

    def __init__(self, path: Path, fmt: common_pb2.AudioFormat) -> None:
        if not fits(fmt):
            raise ValueError("FlacPcm keeps 16-bit PCM only")
        self.path, self.fmt = path, fmt
        self.size = 0
        self.frames = 0
        self._pending = bytearray()
        self._writer: soundfile.SoundFile | None = soundfile.SoundFile(
            path, "w", fmt.sample_rate_hz, fmt.channels, format="FLAC", subtype="PCM_16")
        self._reader: soundfile.SoundFile | None = None
        self._lock = threading.Lock()

    # ----- writing ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Take ``data``; encode what is buffered once it reaches BATCH_BYTES (in this thread)."""
        if self._take(data):
            self._encode(whole_frames=True)

    async def append(self, data: bytes) -> None:
        """``write`` for the event loop: the encoding runs in a worker thread."""
        if self._take(data):
            await asyncio.to_thread(self._encode, True)

    def finish(self) -> None:
        """Encode the rest and close the file for reading; a partial frame left over is an error."""
        if self._writer is None:
            return
        audio.check_whole_frames(self.size, self.fmt)
        self._encode(whole_frames=False)
        self.frames = self._writer.frames
        self._writer.close()
        self._writer = None

    def _take(self, data: bytes) -> bool:
        if self._writer is None:
            raise RuntimeError("write after finish")
        self._pending += data
        self.size += len(data)
        return len(self._pending) >= BATCH_BYTES

    def _encode(self, whole_frames: bool) -> None:
        frame = audio.bytes_per_frame(self.fmt)
        usable = len(self._pending) // frame * frame if whole_frames else len(self._pending)
        if usable == 0 or self._writer is None:
            return
        # One copy, not two (a bytearray slice, then bytes of it): 4 MiB less at the peak.
        samples = np.frombuffer(bytes(memoryview(self._pending)[:usable]), dtype="<i2").reshape(-1, self.fmt.channels)
        del self._pending[:usable]
        self._writer.write(samples)

    # ----- reading ----------------------------------------------------------------------
    def read(self, lo: int, hi: int) -> np.ndarray:
        """Samples [lo, hi) (within the file) as int16, shape (n, channels)."""
        lo, hi = max(0, lo), min(hi, self.frames)
        if hi <= lo:
            return np.zeros((0, self.fmt.channels), dtype=np.int16)
        with self._lock:
            if self._reader is None:
                self._reader = soundfile.SoundFile(self.path)
            if self._reader.tell() != lo:  # sequential reads need no seek
                self._reader.seek(lo)
            return self._reader.read(hi - lo, dtype="int16", always_2d=True)

    def iter_pcm(self, block_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The raw PCM again, in pieces of about ``block_bytes``."""
        step = max(1, block_bytes // audio.bytes_per_frame(self.fmt))
        for lo in range(0, self.frames, step):
            yield self.read(lo, lo + step).astype("<i2", copy=False).tobytes()

    def release(self) -> None:
        """Close the file's reader until the next read (a caller done with it for now)."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def close(self) -> None:
        """Close the file and remove it."""
        with self._lock:
            for handle in (self._writer, self._reader):
                if handle is not None:
                    handle.close()
            self._writer = self._reader = None
        self.path.unlink(missing_ok=True)


class FlacSegments:
    """Raw 16-bit PCM appended in pieces and kept as FLAC segments of ``segment_bytes`` raw
    bytes each, readable at any frame offset while it still grows: the sealed segments from
    their files, the rest from memory (less than ``segment_bytes``, and a copy of a segment's
    worth while it is sealed). A FLAC file cannot be read while it is written; segments can.

    Appends come from one caller at a time; reads from any thread. Readers stay open on at
    most ``OPEN_READERS`` segments (the least recently read is closed), so a long track
    read here and there holds no file handle per segment.
    """

    SEGMENT_BYTES = 8 * vocab.MIB  # 44 s of stereo 16-bit audio at 48 kHz, 87 s of mono
    OPEN_READERS = 4

    def __init__(self, folder: Path, name: str, fmt: common_pb2.AudioFormat,
                 segment_bytes: int | None = None) -> None:
        if not fits(fmt):
            raise ValueError("FlacSegments keeps 16-bit PCM only")
        frame = audio.bytes_per_frame(fmt)
        self.folder, self.name, self.fmt = folder, name, fmt
        self.segment_frames = max(1, (segment_bytes or self.SEGMENT_BYTES) // frame)
        self.segment_bytes = self.segment_frames * frame
        self.size = 0  # raw bytes taken (what a byte limit applies to)
        self.segments: list[FlacPcm] = []
        self._tail = bytearray()  # what follows the sealed segments
        self._lock = threading.Lock()  # the segments and the tail, changed together
        self._open: OrderedDict[int, None] = OrderedDict()  # segments with a reader open, oldest first
        self.finished = False

    @property
    def frames(self) -> int:
        """Whole frames readable now."""
        with self._lock:
            return self.size // audio.bytes_per_frame(self.fmt)

    def write(self, data: bytes) -> None:
        """Take ``data``; a full segment is sealed in this thread."""
        self._take(data)
        while len(self._tail) >= self.segment_bytes:
            self._seal()

    async def append(self, data: bytes) -> None:
        """``write`` for the event loop: sealing runs in a worker thread."""
        self._take(data)
        while len(self._tail) >= self.segment_bytes:
            await asyncio.to_thread(self._seal)

    def finish(self) -> None:
        """No more bytes come; a partial frame left over is an error. What follows the last
        full segment stays in memory (less than a segment): a short track is never encoded
        and decoded at all."""
        if self.finished:
            return
        audio.check_whole_frames(self.size, self.fmt)
        self.finished = True

    def _take(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write after finish")
        with self._lock:
            self._tail += data
            self.size += len(data)

    def _seal(self) -> None:
        """The tail's first segment's worth as a sealed segment: every segment is full, so
        frame ``f`` lies in segment ``f // segment_frames``."""
        size = self.segment_bytes
        segment = FlacPcm(self.folder / f"{self.name}.{len(self.segments)}.flac", self.fmt)
        try:
            for lo in range(0, size, CHUNK_BYTES):  # a piece at a time: no copy of the whole segment
                with self._lock:
                    piece = bytes(self._tail[lo : min(size, lo + CHUNK_BYTES)])
                segment.write(piece)
            segment.finish()
        except BaseException:
            segment.close()
            raise
        with self._lock:  # readers see the samples in the segment or in the tail, never neither
            self.segments.append(segment)
            del self._tail[:size]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Frames [lo, hi) of what is readable now, as int16 (n, channels), cut at its end
        (read-only where it came from memory)."""
        frame = audio.bytes_per_frame(self.fmt)
        lo = max(0, lo)
        parts: list[np.ndarray] = []
        while lo < hi:
            with self._lock:
                index = lo // self.segment_frames
                if index < len(self.segments):
                    segment: FlacPcm | None = self.segments[index]
                    self._open[index] = None
                    self._open.move_to_end(index)
                    stale = list(self._open)[: -self.OPEN_READERS]
                    idle = [self.segments[i] for i in stale]
                    for i in stale:
                        del self._open[i]
                    tail = b""
                else:
                    segment, idle = None, []
                    start = (lo - len(self.segments) * self.segment_frames) * frame
                    tail = bytes(self._tail[start : start + (hi - lo) * frame])
            for old in idle:
                old.release()
            if segment is not None:
                base = index * self.segment_frames
                part = segment.read(lo - base, min(hi, base + self.segment_frames) - base)
            else:
                part = np.frombuffer(tail[: len(tail) // frame * frame], dtype="<i2").reshape(-1, self.fmt.channels)
            if part.shape[0] == 0:
                break
            parts.append(part)
            lo += part.shape[0]
        if not parts:
            return np.zeros((0, self.fmt.channels), dtype=np.int16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        """Remove every segment; nothing can be read after this."""
        with self._lock:
            segments, self.segments = self.segments, []
            self._tail = bytearray()
            self._open.clear()
        for segment in segments:
            segment.close()


class MonoFlac(audio.WindowedMono):
    """A finished mono ``FlacSegments`` store read as a recording, a window at a time; the
    recording owns the store (``close`` removes it), its other readers share it."""

    def __init__(self, store: FlacSegments, owner: bool = True) -> None:
        if store.fmt.channels != 1 or not store.finished:
            raise ValueError("MonoFlac reads a finished mono store")
        self.store, self.owner = store, owner
        self._start(store.frames, store.fmt)

    def _read(self, start: int, end: int) -> np.ndarray:
        return audio.s16_to_float(self.store.read(start, end)[:, 0])

    def reader(self) -> MonoFlac:
        return MonoFlac(self.store, owner=False)

    def close(self) -> None:
        if self.owner:
            self.store.close()
