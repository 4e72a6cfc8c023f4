"""PCM audio as it travels between services: AudioFormat checks and conversions."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bgm import media, vocab
from bgm.chunks import Spool, payloads, spool_payload
from bgm.errors import InvalidInput
from bgm.v1 import common_pb2

PCM_S16LE = common_pb2.ENCODING_PCM_S16LE
PCM_F32LE = common_pb2.ENCODING_PCM_F32LE
CONTAINER = common_pb2.ENCODING_CONTAINER

MIN_RATE, MAX_RATE = 8_000, 192_000
MAX_CHANNELS = 8


def audio_format(sample_rate: int, channels: int, encoding: int = PCM_F32LE) -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(sample_rate_hz=sample_rate, channels=channels, encoding=encoding)  # type: ignore[arg-type]


def check_format(fmt: common_pb2.AudioFormat, what: str = "audio") -> None:
    """Raise InvalidInput unless ``fmt`` describes audio we can take."""
    if fmt.encoding == CONTAINER:
        return
    if fmt.encoding not in (PCM_S16LE, PCM_F32LE):
        raise InvalidInput(f"{what}: set format.encoding to PCM_S16LE, PCM_F32LE or CONTAINER")
    if not MIN_RATE <= fmt.sample_rate_hz <= MAX_RATE:
        raise InvalidInput(
            f"{what}: sample rate {fmt.sample_rate_hz} Hz is not supported "
            f"(use {MIN_RATE}..{MAX_RATE} Hz, or send a container)"
        )
    if not 1 <= fmt.channels <= MAX_CHANNELS:
        raise InvalidInput(f"{what}: {fmt.channels} channels is not supported (1..{MAX_CHANNELS})")


def bytes_per_frame(fmt: common_pb2.AudioFormat) -> int:
    return fmt.channels * (2 if fmt.encoding == PCM_S16LE else 4)


def pcm_bytes(fmt: common_pb2.AudioFormat, seconds: float) -> int:
    """How many bytes ``seconds`` of raw PCM in ``fmt`` take."""
    return int(seconds * fmt.sample_rate_hz + 1) * bytes_per_frame(fmt)


def check_whole_frames(size: int, fmt: common_pb2.AudioFormat) -> None:
    if size % bytes_per_frame(fmt):
        raise InvalidInput(
            f"PCM byte count {size} is not a whole number of {fmt.channels}-channel frames; "
            "the stream was cut or the format is wrong"
        )


def s16_to_float(samples: np.ndarray) -> np.ndarray:
    """16-bit samples (any shape) as float32 in [-1, 1): every reader of 16-bit audio scales
    them the same, so the same samples give the same floats (and digests) however kept."""
    return samples.astype(np.float32) / np.float32(32768.0)


def pcm_to_float(data: bytes, fmt: common_pb2.AudioFormat) -> np.ndarray:
    """Raw PCM bytes to float32 frames (n, channels)."""
    check_whole_frames(len(data), fmt)
    if fmt.encoding == PCM_S16LE:
        samples = s16_to_float(np.frombuffer(data, dtype="<i2"))
    else:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(samples)):
            raise InvalidInput("PCM_F32LE audio contains NaN or infinite samples")
    return samples.reshape(-1, fmt.channels)


def float_to_pcm(frames: np.ndarray, encoding: int = PCM_F32LE) -> bytes:
    frames = np.asarray(frames, dtype=np.float32)
    if encoding == PCM_S16LE:
        return (np.clip(frames, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    return frames.astype("<f4").tobytes()


def cap_spool(spool: Spool, fmt: common_pb2.AudioFormat, max_duration_s: float, setting: str) -> None:
    """Refuse raw PCM past ``max_duration_s`` while it streams in (a container is measured
    when it is decoded)."""
    if fmt.encoding in (PCM_S16LE, PCM_F32LE):
        spool.cap(pcm_bytes(fmt, max_duration_s), media.too_long("audio", max_duration_s, setting))


def load_audio(path: Path, fmt: common_pb2.AudioFormat, sample_rate: int, channels: int,
               max_duration_s: float | None = None, setting: str = "MAX_DURATION_S") -> np.ndarray:
    """Streamed-in audio (raw PCM or a container file) as float32 (n, channels) at ``sample_rate``;
    InvalidInput where it is longer than ``max_duration_s``."""
    if fmt.encoding == CONTAINER:
        media.probe(path, "audio")
        return media.decode_audio(path, sample_rate, channels, "audio", max_duration_s, setting)
    if max_duration_s is not None and path.stat().st_size > pcm_bytes(fmt, max_duration_s):
        raise media.too_long("audio", max_duration_s, setting)
    frames = mix_channels(pcm_file_to_float(path, fmt), channels)
    return resample(frames, fmt.sample_rate_hz, sample_rate)


def pcm_file_to_float(path: Path, fmt: common_pb2.AudioFormat, piece_bytes: int = 4 * vocab.MIB) -> np.ndarray:
    """``pcm_to_float`` of a file's bytes, read a few MB at a time into the result: a long
    track is held once, as floats, never also as bytes."""
    size, width = path.stat().st_size, bytes_per_frame(fmt)
    check_whole_frames(size, fmt)
    frames = np.empty((size // width, fmt.channels), dtype=np.float32)
    flat = frames.reshape(-1)
    piece_bytes -= piece_bytes % width
    done = 0
    with open(path, "rb") as f:
        while piece := f.read(piece_bytes):
            part = pcm_to_float(piece, fmt).reshape(-1)
            flat[done : done + part.shape[0]] = part
            done += part.shape[0]
    return frames


def convert_pcm(data: bytes, fmt: common_pb2.AudioFormat, sample_rate: int, channels: int,
                encoding: int = PCM_F32LE) -> bytes:
    """Raw PCM in ``fmt`` as ``audio_format(sample_rate, channels, encoding)``."""
    if fmt.encoding not in (PCM_S16LE, PCM_F32LE):
        raise InvalidInput(f"expected raw PCM audio, got encoding {fmt.encoding}")
    frames = mix_channels(pcm_to_float(data, fmt), channels)
    return float_to_pcm(resample(frames, fmt.sample_rate_hz, sample_rate), encoding)


def mix_channels(frames: np.ndarray, channels: int) -> np.ndarray:
    if frames.shape[1] == channels:
        return frames
    mono = frames.mean(axis=1, keepdims=True)
    return np.repeat(mono, channels, axis=1) if channels > 1 else mono


def resample(frames: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling (polyphase), frames (n, channels) float32."""
    if rate_in == rate_out or frames.shape[0] == 0:
        return frames.astype(np.float32, copy=False)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(frames, rate_out // g, rate_in // g, axis=0).astype(np.float32)


class Recording(Protocol):
    """Mono float32 samples: an array, or a file read a window at a time (``MonoPcmFile``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice, /) -> np.ndarray: ...


class WindowedMono:
    """A long mono recording as a read-only 1-D float32 array (``x.shape``, ``x[a:b]``) that
    holds a window of it at a time: the services walk through a recording in order, so a
    long one is never held whole (an hour at 48 kHz is 0.7 GB as floats). Subclasses say
    where the samples lie (``_read``)."""

    WINDOW_S = 10.0
    shape: tuple[int]
    fmt: common_pb2.AudioFormat

    def _start(self, frames: int, fmt: common_pb2.AudioFormat) -> None:
        self.shape, self.fmt = (frames,), fmt
        self.window = max(1, int(self.WINDOW_S * fmt.sample_rate_hz))
        self._lo = 0
        self._held = np.zeros(0, dtype=np.float32)

    def _read(self, start: int, end: int) -> np.ndarray:
        raise NotImplementedError

    def reader(self) -> WindowedMono:
        """Another reader of the same samples, for another thread (each keeps its window)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the samples (where this reader owns them)."""

    async def __aenter__(self) -> WindowedMono:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError(f"{type(self).__name__} takes slices")
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError(f"{type(self).__name__} takes contiguous slices")
        stop = max(start, stop)
        if start < self._lo or stop > self._lo + self._held.shape[0]:
            end = min(self.shape[0], max(stop, start + self.window))
            self._lo, self._held = start, self._read(start, end)
        return self._held[start - self._lo : stop - self._lo]

    def blocks(self) -> Iterator[np.ndarray]:
        """The whole recording, a window at a time."""
        for start in range(0, self.shape[0], self.window):
            yield self[start : start + self.window]

    def digest(self) -> str:
        """A fingerprint of the samples as floats (a cache key part), read a window at a time."""
        made = hashlib.sha256(f"<f4({self.shape[0]},)".encode())
        for block in self.blocks():
            made.update(np.ascontiguousarray(block).data)
        return made.hexdigest()


def own_reader(recording: Recording) -> Recording:
    """A reader of ``recording`` for another thread or a second pass (a windowed reader keeps
    one window; an array needs none of its own)."""
    return recording.reader() if isinstance(recording, WindowedMono) else recording


class MonoPcmFile(WindowedMono):
    """Mono raw PCM in a file (16-bit or float), read a window at a time."""

    def __init__(self, path: Path, fmt: common_pb2.AudioFormat) -> None:
        check_whole_frames(path.stat().st_size, fmt)
        if fmt.channels != 1 or fmt.encoding not in (PCM_S16LE, PCM_F32LE):
            raise ValueError("MonoPcmFile reads mono raw PCM")
        self.path = path
        self.width = bytes_per_frame(fmt)
        self._start(path.stat().st_size // self.width, fmt)

    def _read(self, start: int, end: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(start * self.width)
            return pcm_to_float(f.read((end - start) * self.width), self.fmt)[:, 0]

    def reader(self) -> MonoPcmFile:
        return MonoPcmFile(self.path, self.fmt)


def open_mono(path: Path, fmt: common_pb2.AudioFormat, sample_rate: int, max_duration_s: float, setting: str,
              scratch: Path) -> MonoPcmFile:
    """Streamed-in audio as mono at ``sample_rate`` read a window at a time: raw mono PCM at
    that rate (what the gateway sends each service) where it lies; anything else decoded
    once and rewritten so into ``scratch`` (that decode holds it whole)."""
    if fmt.encoding in (PCM_S16LE, PCM_F32LE) and fmt.sample_rate_hz == sample_rate and fmt.channels == 1:
        if path.stat().st_size > pcm_bytes(fmt, max_duration_s):
            raise media.too_long("audio", max_duration_s, setting)
        recording = MonoPcmFile(path, fmt)
        if fmt.encoding == PCM_F32LE:
            for _ in recording.blocks():  # NaN or infinity is refused now, before any work starts
                pass
        return recording
    mono = load_audio(path, fmt, sample_rate, 1, max_duration_s, setting)[:, 0]
    converted = scratch / f"mono-{sample_rate}.f32"
    mono.astype("<f4").tofile(converted)
    return MonoPcmFile(converted, audio_format(sample_rate, 1))


async def receive_recording(rest: AsyncIterator[Any], spool: Spool, fmt: common_pb2.AudioFormat, sample_rate: int,
                            max_duration_s: float, setting: str, scratch: Path) -> WindowedMono:
    """The audio messages that follow a stream's config (``rest``, from ``read_config``)
    received, refused past the duration limit as they arrive, and opened as a recording
    read a window at a time: what Separate and Transcribe both begin with. Mono 16-bit at
    ``sample_rate`` (what the gateway sends) is kept as FLAC segments in ``scratch`` as it
    comes (an hour at 48 kHz is some 330 MiB raw); anything else is spooled and opened with
    ``open_mono``. The caller closes the recording."""
    cap_spool(spool, fmt, max_duration_s, setting)
    if fmt.encoding == PCM_S16LE and fmt.channels == 1 and fmt.sample_rate_hz == sample_rate:
        from bgm import flac  # built on this module

        store = flac.FlacSegments(scratch, "recording", fmt)
        try:
            async for data in payloads(rest, "config", "audio"):
                spool.reserve(len(data))  # the spool's limits, the bytes kept as FLAC
                await store.append(data)
            if store.size == 0:
                raise InvalidInput("no audio was sent after the config message")
            store.finish()
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        return flac.MonoFlac(store)
    await spool_payload(rest, spool, "config", "audio")
    if spool.size == 0:
        raise InvalidInput("no audio was sent after the config message")
    return await asyncio.to_thread(open_mono, spool.finish(), fmt, sample_rate, max_duration_s, setting, scratch)
