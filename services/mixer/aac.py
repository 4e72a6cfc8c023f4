"""The mix encoded to AAC once, then patched where the codec went over the true-peak ceiling.

A lossy codec's overshoot is quantisation noise on a peak: it cannot be predicted frame by
frame (encoding short excerpts put their frames' peaks up to 2 dB, 0.45 dB at the 99th
percentile, from the full encode's, and missed the one frame over in a 10-minute programme).
So the whole mix is encoded, the
encoded file is decoded and measured, and each place that went over is dipped (see
``dsp.codec_dip_frames``), encoded again on its own with some context, and its AAC frames
replace the first encode's. Encoding the whole mix again instead cost a full encode and a
full check (encodes over the ceiling by 0.02 dB in one frame of 60,000 did that).

An AAC-LC frame's decoded samples come from that frame and the one before it (their
transforms overlap by half), so a patch changes the decoded audio only within itself and
one frame after it; outside a dip the patch encodes the same samples as the first encode, so
at the joins the two encodes' frames overlap where both carry the same signal. The
encoder's first frame is its priming (PRIMING samples of delay): the encoded stream's frame
``m`` decodes to the mix's samples ``[(m - 1) * FRAME, m * FRAME)``, and a patch that starts
at sample ``s`` (a whole number of frames) has the same frames shifted by ``s / FRAME``.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from bgm import media, processes
from bgm.errors import InvalidInput
from services.mixer import dsp

RATE = dsp.SAMPLE_RATE
CHANNELS = 2
FRAME = 1024  # samples per AAC frame
PRIMING = FRAME  # ffmpeg's AAC encoder delays its output by one frame
READ_BYTES = 1 << 20
UNIT = 15 * FRAME  # 320 ms: whole AAC frames and whole 10 ms frames, so both grids line up
# Where encoders working on shares of one mix meet: whole UNITs and whole 100 ms loudness
# steps (1.6 s), so the shares' frames, 10 ms peaks and loudness steps join end to end.
SHARE_GRID = math.lcm(UNIT, RATE // 10)
# ffmpeg's AAC encoder rebuilds stereo from intensity and fills bands with noise (PNS) by
# default: tools for low bitrates that put peaks where the mix had none (up to 2.7 dB over
# the true-peak ceiling at a speech onset) and replace the music's texture. The "fast"
# coder: 2.4x quicker than the default two-loop search on a 30 s mix at 192 kb/s, with no
# loss at this rate (waveform SNR 35.2 dB against 32.3 dB measured).
ENCODER_OPTIONS: dict[str, str | int] = {"aac_is": 0, "aac_pns": 0, "aac_coder": "fast"}


@dataclass(frozen=True)
class Stream:
    """An ADTS file and where each of its frames starts (``starts[-1]`` is the file's size)."""

    path: Path
    starts: np.ndarray

    @classmethod
    def read(cls, path: Path) -> Stream:
        """The frames' starts, from their headers read a MiB at a time (an hour's stream is
        86 MB, which need not be held to find 170,000 offsets)."""
        starts = [0]
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buffer, base = b"", 0  # buffer[0] is byte ``base`` of the file
            while starts[-1] < size:
                at = starts[-1]
                if at + 7 > base + len(buffer):
                    f.seek(at)
                    buffer, base = f.read(READ_BYTES), at
                header = buffer[at - base : at - base + 7]
                if len(header) < 7 or header[0] != 0xFF or header[1] & 0xF0 != 0xF0 or header[6] & 0x03:
                    raise ValueError(f"not one raw block per ADTS frame at byte {at}")
                length = ((header[3] & 0x03) << 11) | (header[4] << 3) | (header[5] >> 5)
                if length < 7:
                    raise ValueError(f"an ADTS frame of {length} bytes at byte {at}")
                starts.append(at + length)
        if starts[-1] != size:
            raise ValueError("the ADTS stream ends inside a frame")
        return cls(path, np.asarray(starts, dtype=np.int64))

    @property
    def count(self) -> int:
        return self.starts.shape[0] - 1

    def frames(self, a: int, b: int) -> bytes:
        """The bytes of frames [a, b) (a short run: ``copy_frames`` for a long one)."""
        with open(self.path, "rb") as f:
            f.seek(int(self.starts[a]))
            return f.read(int(self.starts[b] - self.starts[a]))

    def copy_frames(self, out: IO[bytes], a: int, b: int) -> None:
        """Frames [a, b) written to ``out`` a MiB at a time."""
        with open(self.path, "rb") as f:
            f.seek(int(self.starts[a]))
            left = int(self.starts[b] - self.starts[a])
            while left:
                piece = f.read(min(left, READ_BYTES))
                if not piece:
                    raise ValueError(f"{self.path.name} is shorter than its frames")
                out.write(piece)
                left -= len(piece)


def _encoder(bitrate: str, outputs: str) -> list[str]:
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "f32le", "-ar", str(RATE),
            "-ac", str(CHANNELS), "-i", "pipe:0", "-map", "0:a", "-c:a", "aac", "-b:a", bitrate,
            *(x for name, value in ENCODER_OPTIONS.items() for x in (f"-{name}", str(value))), *outputs.split("\0")]


def feed(proc: subprocess.Popen[bytes], blocks: Iterable[np.ndarray]) -> None:
    """Float blocks into a child's stdin as f32le, which is then closed."""
    assert proc.stdin is not None
    try:
        for block in blocks:
            proc.stdin.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # ffmpeg stopped early: its exit status and message say why


def _failed(errors: IO[bytes], what: str) -> InvalidInput:
    errors.seek(0)
    message = errors.read(4096).decode(errors="replace").strip().splitlines()
    return InvalidInput(f"could not {what} ({message[-1][:300] if message else 'ffmpeg failed'})")


def encode(blocks: Iterable[np.ndarray], target: Path, bitrate: str,
           decoded_to: Callable[[np.ndarray], None] | None = None) -> Stream:
    """Float (m, 2) blocks at 48 kHz, piped in as they are made, to an ADTS file; with
    ``decoded_to``, the stream is also decoded as it is made and the mix it decodes to
    (priming dropped) handed over a block at a time, from another thread: the check of the
    encode runs on the core the encoder leaves free."""
    if decoded_to is None:
        with tempfile.TemporaryFile() as errors, processes.child(
                _encoder(bitrate, f"-f\0adts\0-y\0{target}"), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=errors) as proc:
            feed(proc, blocks)
            if proc.wait(timeout=3600) != 0:
                raise _failed(errors, "encode the mix")
        return Stream.read(target)
    if any(c in str(target) for c in "[]|\\"):
        raise ValueError(f"a path the tee muxer cannot take: {target}")
    decoder = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "aac", "-i", "pipe:0",
               "-f", "f32le", "-ac", str(CHANNELS), "-ar", str(RATE), "pipe:1"]
    failure: list[BaseException] = []

    def check(source: IO[bytes]) -> None:
        skip = PRIMING * CHANNELS * 4
        try:
            while piece := source.read(1 << 20):
                if skip:
                    dropped = min(skip, len(piece))
                    piece, skip = piece[dropped:], skip - dropped
                usable = len(piece) - len(piece) % (CHANNELS * 4)
                if usable:
                    decoded_to(np.frombuffer(piece[:usable], "<f4").reshape(-1, CHANNELS))
        except BaseException as error:  # handed to the caller; the rest of the pipe is drained
            failure.append(error)
            while source.read(1 << 20):
                pass

    with tempfile.TemporaryFile() as errors, tempfile.TemporaryFile() as decode_errors, processes.child(
            _encoder(bitrate, f"-f\0tee\0-y\0[f=adts]{target}|[f=adts]pipe:1"), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=errors) as proc, processes.child(
            decoder, stdin=proc.stdout, stdout=subprocess.PIPE, stderr=decode_errors) as dec:
        assert proc.stdout is not None and dec.stdout is not None
        proc.stdout.close()  # the decoder holds it: it sees the end when the encoder ends
        reader = threading.Thread(target=check, args=(dec.stdout,), name="bgm-aac-check", daemon=True)
        reader.start()
        feed(proc, blocks)
        encoded, decoding = proc.wait(timeout=3600), dec.wait(timeout=3600)
        reader.join()
        if encoded != 0:
            raise _failed(errors, "encode the mix")
        if decoding != 0:
            raise _failed(decode_errors, "decode the encoded mix")
    if failure:
        raise failure[0]
    return Stream.read(target)


def splice(stream: Stream, runs: list[tuple[int, int, int]], patch: Stream) -> Stream:
    """``stream`` with, for each (a, b, p) in ``runs`` (in order, apart), its frames [a, b)
    replaced by ``patch``'s frames from ``p`` on."""
    target = stream.path.with_suffix(".patched.aac")
    at = 0
    with open(target, "wb") as out:
        for a, b, p in runs:
            if a < at or p < 1 or p + b - a > patch.count:
                raise ValueError("patch runs out of order or out of the patch")
            stream.copy_frames(out, at, a)
            patch.copy_frames(out, p, p + b - a)
            at = b
        stream.copy_frames(out, at, stream.count)
    os.replace(target, stream.path)
    return Stream.read(stream.path)


@dataclass(frozen=True)
class Region:
    """Samples [lo, hi) of the mix (whole UNITs, or up to the end) to encode again."""

    lo: int
    hi: int


def regions(changed: np.ndarray, n: int) -> list[Region]:
    """The 10 ms frames marked in ``changed``, widened by a UNIT either side (so a patch's
    joins lie where its signal is the first encode's) and merged, on the UNIT grid."""
    per_unit = UNIT // dsp.FRAME
    out: list[Region] = []
    for frame in np.flatnonzero(changed):
        lo = max(0, (int(frame) // per_unit - 1) * UNIT)
        hi = min(n, (int(frame) // per_unit + 2) * UNIT)
        if out and lo <= out[-1].hi + 2 * UNIT:  # a patch's context would overlap the next: one patch
            out[-1] = Region(out[-1].lo, max(out[-1].hi, hi))
        else:
            out.append(Region(lo, hi))
    return out


def patched(stream: Stream, places: list[Region], n: int, render: Callable[[int, int], Iterator[np.ndarray]],
            bitrate: str) -> Stream:
    """``stream`` with each region encoded again from ``render(lo, hi)`` (the mix's samples
    [lo, hi) in blocks), with a UNIT of context either side so the encoder has settled: the
    regions' excerpts go through one encoder, one after another, and one rewrite of the file
    splices them in."""
    excerpts = [(max(0, r.lo - UNIT), min(n, r.hi + UNIT)) for r in places]

    def blocks() -> Iterator[np.ndarray]:
        for start, end in excerpts:
            yield from render(start, end)

    runs = []
    offset = 1  # the patch's priming frame
    for region, (start, end) in zip(places, excerpts, strict=True):
        a = region.lo // FRAME + 1
        b = stream.count if end == n else region.hi // FRAME + 1
        runs.append((a, b, offset + a - 1 - start // FRAME))
        offset += -(-(end - start) // FRAME)
    with tempfile.NamedTemporaryFile(suffix=".aac", dir=stream.path.parent) as part:
        encoded = encode(blocks(), Path(part.name), bitrate)
        if encoded.count != offset:
            raise ValueError(f"the patches encoded to {encoded.count} frames, not {offset}")
        return splice(stream, runs, encoded)


def measured(stream: Stream, places: list[Region], n: int, ceiling: float) -> list[tuple[int, np.ndarray]]:
    """For each region, the true peak (linear) per 10 ms frame of what patching it can have
    changed (from its start to a UNIT past it), as (first frame, peaks): the frames around
    all regions decoded in one go, with context either side for the meter's filters."""
    if not places:
        return []
    spans = [(max(0, r.lo - 2 * UNIT), min(n, r.hi + 3 * UNIT)) for r in places]
    # Each span's frames, after a lead frame whose output is dropped (its own predecessor is
    # not there: the previous span's last frame, or for frame 0 the priming).
    frame_runs = [(max(0, start // FRAME), min(stream.count, -(-end // FRAME) + 1)) for start, end in spans]
    with tempfile.NamedTemporaryFile(suffix=".aac", dir=stream.path.parent) as part:
        for a, b in frame_runs:
            stream.copy_frames(part, a, b)
        part.flush()
        pcm = media.decode_audio(part.name, RATE, CHANNELS, "the patched mix")
    out = []
    at = 0
    for region, (start, end), (a, b) in zip(places, spans, frame_runs, strict=True):
        audio = pcm[at + FRAME : at + (b - a) * FRAME][: end - start]
        at += (b - a) * FRAME
        meter = dsp.PeakMeter(ceiling)
        meter.feed(audio)
        meter.finish()
        peaks = meter.frame_peaks(-(-(end - start) // dsp.FRAME))
        lo, hi = region.lo, min(n, region.hi + UNIT)
        first = (lo - start) // dsp.FRAME
        out.append((lo // dsp.FRAME, peaks[first : first + -(-(hi - lo) // dsp.FRAME)]))
    return out


def share_points(n: int, parts: int, min_share: int) -> list[int]:
    """Where ``parts`` encoders' shares of an ``n``-sample mix meet (on SHARE_GRID), each
    share at least ``min_share`` samples: fewer shares where the mix is too short."""
    parts = max(1, min(parts, n // max(1, min_share)))
    points = sorted({round(n * i / parts / SHARE_GRID) * SHARE_GRID for i in range(1, parts)})
    return [p for p in points if UNIT < p < n - UNIT]


def encode_shares(render: Callable[[int, int], Iterator[np.ndarray]], n: int, target: Path, bitrate: str,
                  points: Sequence[int], decoded_to: Callable[[int], Callable[[np.ndarray], None]]) -> Stream:
    """The mix (``render(lo, hi)`` gives samples [lo, hi) in blocks) encoded by one encoder
    per share between ``points``, at once (the AAC encoder uses one core), and joined into
    one ADTS file at ``target``. Each share after the first starts a UNIT early and each
    before the last ends a UNIT late, so that at every join both encoders had settled on the
    same signal (as a patch's joins: see the module's note). ``decoded_to(i)`` takes share
    ``i``'s own samples as its encode decodes them; at a join the joined stream decodes one
    AAC frame differently from either share (the frame overlaps both): ``measured`` on a
    ``Region(p, p)`` measures it."""
    bounds = [0, *points, n]
    shares = [(max(0, a - UNIT), min(n, b + UNIT)) for a, b in itertools.pairwise(bounds)]
    if len(shares) == 1:
        return encode(render(0, n), target, bitrate, decoded_to(0))
    paths = [target.with_suffix(f".{i}.aac") for i in range(len(shares))]

    def one(i: int) -> Stream:
        lo, hi = shares[i]
        return encode(render(lo, hi), paths[i], bitrate, _skipping(decoded_to(i), bounds[i] - lo))

    try:
        with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="bgm-aac-share") as pool:
            encoded = list(pool.map(one, range(len(shares))))
        # Share i's frame p is the joined stream's frame p + lo / FRAME; it keeps the frames
        # that decode to its own samples [bounds[i], bounds[i + 1]). The first share becomes
        # the file, cut after its own frames, and the rest are appended (one stream's size on
        # disk at any time, plus the share being copied).
        os.replace(paths[0], target)
        os.truncate(target, int(encoded[0].starts[bounds[1] // FRAME + 1]))
        with open(target, "ab") as out:
            for i in range(1, len(shares)):
                lo, stream = shares[i][0], encoded[i]
                last = stream.count if i == len(shares) - 1 else bounds[i + 1] // FRAME + 1 - lo // FRAME
                stream.copy_frames(out, bounds[i] // FRAME + 1 - lo // FRAME, last)
                stream.path.unlink()
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return Stream.read(target)


def _skipping(feed: Callable[[np.ndarray], None], count: int) -> Callable[[np.ndarray], None]:
    """``feed`` without the first ``count`` samples it would be given."""
    left = count

    def skipped(piece: np.ndarray) -> None:
        nonlocal left
        if left:
            dropped = min(left, piece.shape[0])
            piece, left = piece[dropped:], left - dropped
        if piece.shape[0]:
            feed(piece)
    return skipped
