"""16-bit PCM kept as FLAC (``bgm.flac``): what goes in in pieces comes back sample for sample."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from bgm import audio, flac
from bgm.errors import InvalidInput


def music_like(seconds: float, channels: int, rate: int = 48_000) -> np.ndarray:
    """A chord with some noise, as 16-bit samples (n, channels)."""
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(7)
    tone = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 4
    frames = tone[:, None] + 0.01 * rng.standard_normal((t.shape[0], channels))
    return (np.clip(frames, -1, 1) * 32767).astype("<i2")


def test_pieces_of_any_size_come_back_exactly_and_smaller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(flac, "BATCH_BYTES", 10_000)  # several batches, each cut inside a frame
    fmt = audio.audio_format(48_000, 2, audio.PCM_S16LE)
    samples = music_like(3.0, 2)
    raw = samples.tobytes()
    store = flac.FlacPcm(tmp_path / "a.flac", fmt)

    async def feed() -> None:
        for start in range(0, len(raw), 7_777):  # odd sizes: pieces end mid-frame
            await store.append(raw[start : start + 7_777])

    asyncio.run(feed())
    store.finish()
    assert store.size == len(raw) and store.frames == samples.shape[0]
    assert store.path.stat().st_size < 0.8 * len(raw)
    assert b"".join(store.iter_pcm(50_000)) == raw
    rng = np.random.default_rng(0)
    for lo in rng.integers(0, samples.shape[0] - 5_000, 20):  # at offsets, in any order
        np.testing.assert_array_equal(store.read(int(lo), int(lo) + 5_000), samples[lo : lo + 5_000])
    assert store.read(samples.shape[0] - 10, samples.shape[0] + 100).shape == (10, 2)
    store.close()
    assert not store.path.exists()


def test_a_track_cut_inside_a_frame_is_refused(tmp_path: Path):
    store = flac.FlacPcm(tmp_path / "b.flac", audio.audio_format(48_000, 2, audio.PCM_S16LE))
    store.write(b"\x00" * 4001)  # a stereo 16-bit frame is 4 bytes
    with pytest.raises(InvalidInput, match="not a whole number"):
        store.finish()
    store.close()


def test_only_16_bit_pcm_is_kept_as_flac():
    assert flac.fits(audio.audio_format(48_000, 1, audio.PCM_S16LE))
    assert not flac.fits(audio.audio_format(48_000, 1, audio.PCM_F32LE))


def test_segments_read_while_they_grow_and_come_back_exactly(tmp_path: Path):
    """``FlacSegments``: 16-bit PCM appended in pieces that end mid-frame is readable at any
    offset as it grows (sealed segments and the part still in memory alike), and once
    finished every sample comes back, across segment edges, with few readers left open."""
    fmt = audio.audio_format(48_000, 2, audio.PCM_S16LE)
    samples = music_like(4.0, 2)
    raw = samples.tobytes()
    store = flac.FlacSegments(tmp_path, "music", fmt, segment_bytes=100_000)  # 0.52 s segments
    rng = np.random.default_rng(1)
    for start in range(0, len(raw), 30_001):
        store.write(raw[start : start + 30_001])
        landed = store.frames
        assert landed == (start + len(raw[start : start + 30_001])) // 4
        lo = int(rng.integers(0, landed))
        np.testing.assert_array_equal(store.read(lo, lo + 40_000), samples[lo : min(landed, lo + 40_000)])
    store.finish()
    assert store.size == len(raw) and store.frames == samples.shape[0]
    sealed = len(store.segments) * store.segment_bytes
    assert len(raw) - sealed < store.segment_bytes  # the rest, less than a segment, in memory
    assert sum(s.path.stat().st_size for s in store.segments) < 0.8 * sealed
    for lo in rng.integers(0, samples.shape[0] - 60_000, 30):  # across edges, in any order
        np.testing.assert_array_equal(store.read(int(lo), int(lo) + 60_000), samples[lo : lo + 60_000])
    assert sum(s._reader is not None for s in store.segments) <= store.OPEN_READERS
    assert store.read(samples.shape[0] - 10, samples.shape[0] + 100).shape == (10, 2)
    assert store.read(samples.shape[0] + 5, samples.shape[0] + 100).shape == (0, 2)
    store.close()
    assert not list(tmp_path.iterdir())


def test_segments_cut_inside_a_frame_are_refused(tmp_path: Path):
    store = flac.FlacSegments(tmp_path, "speech", audio.audio_format(48_000, 2, audio.PCM_S16LE))
    store.write(b"\x00" * 4001)
    with pytest.raises(InvalidInput, match="not a whole number"):
        store.finish()
    store.close()
    assert not list(tmp_path.iterdir())


def _audio_messages(raw: bytes, piece: int):
    from bgm.v1 import stt_pb2

    async def messages():
        for start in range(0, len(raw), piece):
            yield stt_pb2.TranscribeRequest(audio=raw[start : start + piece])

    return messages()


def test_a_received_recording_is_kept_as_flac_and_reads_as_the_raw_one(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """What the gateway sends Separate and Transcribe (mono 16-bit at the service's rate) is
    kept as FLAC segments as it arrives: every window, a second reader's too, and the
    digest (a cache key) are those of the same samples read raw; closing removes it."""
    from bgm.chunks import Spool

    fmt = audio.audio_format(16_000, 1, audio.PCM_S16LE)
    samples = music_like(40.0, 1, 16_000)
    raw = samples.tobytes()
    raw_path = tmp_path / "raw.s16"
    raw_path.write_bytes(raw)
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    async def receive() -> audio.WindowedMono:
        with Spool(10 * len(raw), "audio", str(tmp_path)) as spool:
            return await audio.receive_recording(_audio_messages(raw, 9_999), spool, fmt, 16_000, 3600.0, "LIMIT",
                                                 scratch)

    monkeypatch.setattr(flac.FlacSegments, "SEGMENT_BYTES", 300_000)  # several segments
    recording = asyncio.run(receive())
    plain = audio.MonoPcmFile(raw_path, fmt)
    assert isinstance(recording, flac.MonoFlac) and recording.shape == plain.shape
    on_disk = sum(p.stat().st_size for p in scratch.iterdir())
    assert len(list(scratch.iterdir())) >= 2 and on_disk < 0.8 * len(raw)
    other = recording.reader()
    for lo, hi in [(0, 10), (150_000, 170_000), (299_990, 300_010), (639_000, 640_000), (5, 400_000)]:
        assert np.array_equal(recording[lo:hi], plain[lo:hi])
        assert np.array_equal(other[hi - 1 : hi], plain[hi - 1 : hi])
    assert recording.digest() == plain.digest()
    other.close()  # a second reader leaves the store to its owner
    assert list(scratch.iterdir())
    recording.close()
    assert not list(scratch.iterdir())


def test_a_received_recording_past_its_limit_is_refused_and_removed(tmp_path: Path):
    from bgm.chunks import Spool

    fmt = audio.audio_format(16_000, 1, audio.PCM_S16LE)
    raw = music_like(5.0, 1, 16_000).tobytes()

    async def receive() -> None:
        with Spool(len(raw) // 2, "audio", str(tmp_path)) as spool:
            await audio.receive_recording(_audio_messages(raw, 4_000), spool, fmt, 16_000, 3600.0, "LIMIT", tmp_path)

    with pytest.raises(InvalidInput, match="larger than the limit"):
        asyncio.run(receive())
    assert not list(tmp_path.iterdir())
