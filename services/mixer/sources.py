"""A track of the mix read in windows, so no pass over a long programme holds all of it.

The mix reads its speech and music a block at a time, more than once (measure, level,
encode), and reads a little either side of a block for filter context. A track is 16-bit
PCM at the mix's rate kept as FLAC segments (what the gateway sends: half the disk of the raw
bytes for music, a third for speech), a file of other raw PCM at the mix's rate read at
offsets, or an array (tests, benchmarks). Every read gives 48 kHz stereo float32, silence outside the track, cut at the
mix's length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from bgm import audio, flac, media
from bgm.errors import InvalidInput
from bgm.v1 import common_pb2
from services.mixer import dsp

RATE = dsp.SAMPLE_RATE
CHANNELS = 2
CONVERT_BLOCK = 60 * RATE  # a track in another format is rewritten this much at a time


class Source(Protocol):
    length: int  # samples the mix runs for

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Samples [lo, hi) as (hi - lo, 2) float32, the caller's own (free to change in
        place); silence outside the track."""
        ...


def _stereo(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 1:
        frames = frames[:, None]
    if frames.shape[1] != CHANNELS:  # as ``audio.mix_channels``: the mean of the channels on both
        frames = np.repeat(frames.mean(axis=1, keepdims=True), CHANNELS, axis=1)
    return frames.astype(np.float32, copy=False)


def _padded(frames: np.ndarray, lo: int, hi: int, available: int) -> np.ndarray:
    """``frames`` (the samples from max(lo, 0) to min(hi, available)) placed in [lo, hi)."""
    if lo >= 0 and frames.shape[0] == hi - lo:
        return frames
    out = np.zeros((hi - lo, CHANNELS), dtype=np.float32)
    start = max(0, -lo)
    out[start : start + frames.shape[0]] = frames
    return out


class ArraySource:
    """A track held as an array ((m,), (m, channels)), cut or padded to ``length``."""

    def __init__(self, frames: np.ndarray, length: int | None = None) -> None:
        self.frames = frames if frames.ndim == 2 else frames[:, None]
        self.length = self.frames.shape[0] if length is None else length

    def read(self, lo: int, hi: int) -> np.ndarray:
        available = min(self.frames.shape[0], self.length)
        part = _stereo(self.frames[max(lo, 0) : max(0, min(hi, available))])
        if np.shares_memory(part, self.frames):  # the caller's to change: never the track itself
            part = part.copy()
        return _padded(part, lo, hi, available)


class Silence:
    def __init__(self, length: int) -> None:
        self.length = length

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.zeros((hi - lo, CHANNELS), dtype=np.float32)


class PcmFile:
    """Raw PCM at the mix's rate in a file, read at offsets. With ``written``, a file still
    being written: its whole frames among the first ``written`` bytes."""

    def __init__(self, path: Path, fmt: common_pb2.AudioFormat, length: int, written: int | None = None) -> None:
        if written is None:
            written = path.stat().st_size
            audio.check_whole_frames(written, fmt)
        self.path, self.fmt, self.length = path, fmt, length
        self.dtype = np.dtype("<i2" if fmt.encoding == audio.PCM_S16LE else "<f4")
        self.available = written // audio.bytes_per_frame(fmt)

    def read(self, lo: int, hi: int) -> np.ndarray:
        available = min(self.available, self.length)
        first, last = max(lo, 0), max(0, min(hi, available))
        channels = self.fmt.channels
        if last > first:
            raw = np.fromfile(self.path, dtype=self.dtype, count=(last - first) * channels,
                              offset=first * channels * self.dtype.itemsize).reshape(-1, channels)
            frames = audio.s16_to_float(raw) if self.dtype.kind == "i" else raw.astype(np.float32)
            if not np.all(np.isfinite(frames)):
                raise InvalidInput("PCM_F32LE audio contains NaN or infinite samples")
        else:
            frames = np.zeros((0, channels), dtype=np.float32)
        return _padded(_stereo(frames), lo, hi, available)


class FlacTrack:
    """A track kept as ``flac.FlacSegments``; ``available`` frames of it are readable (all
    of it once it is finished, what has landed while it arrives)."""

    def __init__(self, store: flac.FlacSegments, length: int) -> None:
        self.store, self.length = store, length
        self.available = store.frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        available = min(self.available, self.length)
        words = self.store.read(max(lo, 0), max(0, min(hi, available)))
        return _padded(_stereo(audio.s16_to_float(words)), lo, hi, available)


def kept_as_flac(fmt: common_pb2.AudioFormat) -> bool:
    """Whether a track in this format is kept as FLAC segments (16-bit at the mix's rate)."""
    return read_in_place(fmt) and flac.fits(fmt)


def read_in_place(fmt: common_pb2.AudioFormat) -> bool:
    """Whether a track in this format is read where it lies (raw PCM at the mix's rate)."""
    return fmt.encoding not in (common_pb2.ENCODING_UNSPECIFIED, audio.CONTAINER) and fmt.sample_rate_hz == RATE


OVERRUN_S = 60.0  # a track may run a little past the original (it is cut to it); never far past the limit


def check_length(size: int, fmt: common_pb2.AudioFormat, what: str, max_duration_s: float, setting: str) -> None:
    """Refuse ``size`` bytes of raw PCM in ``fmt`` that run far past the duration limit."""
    if size > audio.pcm_bytes(fmt, max_duration_s + OVERRUN_S):
        raise media.too_long(what, max_duration_s + OVERRUN_S, setting)


def open_track(path: Path, size: int, fmt: common_pb2.AudioFormat, length: int, what: str,
               max_duration_s: float, setting: str, scratch: Path) -> Source:
    """A streamed-in track as a Source ``length`` samples long: silence if nothing was sent.

    Raw PCM at 48 kHz (what the gateway sends) is read where it lies. Another rate, or a
    container, is decoded once and rewritten as such a file in ``scratch`` (that decode holds
    the whole track: a caller sending long tracks sends them at 48 kHz)."""
    if size == 0:
        return Silence(length)
    if fmt.encoding == common_pb2.ENCODING_UNSPECIFIED:
        raise InvalidInput(f"{what} audio was sent without {what}_format in the config")
    if read_in_place(fmt):
        check_length(size, fmt, what, max_duration_s, setting)
        return PcmFile(path, fmt, length)
    frames = audio.load_audio(path, fmt, RATE, CHANNELS, max_duration_s + OVERRUN_S, setting)
    converted = scratch / f"{what}-48k.f32"
    with open(converted, "wb") as f:
        for start in range(0, frames.shape[0], CONVERT_BLOCK):
            f.write(np.ascontiguousarray(frames[start : start + CONVERT_BLOCK], dtype="<f4").tobytes())
    del frames
    return PcmFile(converted, audio.audio_format(RATE, CHANNELS), length)
