"""ffmpeg, locked down for untrusted input.

Every ffmpeg/ffprobe call on user media passes ``-protocol_whitelist file,pipe`` and a
demuxer allow-list, so a crafted file (an HLS playlist, a concat list, ...) can never make
ffmpeg open another file or the network: such formats are refused before they are opened.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bgm import processes
from bgm.errors import InvalidInput

# Ordinary single-file containers only; nothing that refers to other files.
SAFE_DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska,webm",
    "avi", "flv", "mpegts", "mpeg", "ogg", "wav", "w64", "aiff", "caf",
    "mp3", "flac", "aac", "ac3", "eac3", "wv", "opus",
)
DEMUXER_WHITELIST = ",".join(SAFE_DEMUXERS)
INPUT_GUARD = ["-protocol_whitelist", "file,pipe", "-format_whitelist", DEMUXER_WHITELIST]


@dataclass(frozen=True)
class MediaInfo:
    format_name: str
    duration_s: float
    has_video: bool
    has_audio: bool
    audio_sample_rate: int
    audio_channels: int
    video_codec: str
    audio_codec: str


def _short(stderr: bytes, path: str | Path, what: str) -> str:
    """ffmpeg's last complaint, with the server's temp path replaced by what the file is."""
    lines = [ln for ln in stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
    return lines[-1].replace(str(path), what)[:300] if lines else "no detail"


HEADER_TOLERANCE_S = 0.5


def format_duration(seconds: float) -> str:
    """A limit as a person reads it: "45 s", "12 min", "3 h", "1.5 h"."""
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def too_long(what: str, limit_s: float, setting: str) -> InvalidInput:
    return InvalidInput(f"{what} is longer than the limit of {format_duration(limit_s)} ({setting}); "
                        "send a shorter file")


def probe(path: str | Path, what: str = "input", max_duration_s: float | None = None,
          setting: str = "MAX_DURATION_S") -> MediaInfo:
    """Describe a media file, or raise InvalidInput if it is not one we accept.

    With ``max_duration_s``, the duration is measured from the streams' packets (headers can
    say anything: a 30-minute mkv that claims 2 s, a 3 s file that claims 10 minutes, or none
    at all, as a browser's MediaRecorder writes to a pipe), and a file longer than the limit
    is refused as soon as the measurement passes it.
    """
    info = _probe_header(path, what)
    if max_duration_s is None:
        return info
    measured = measure_duration(path, max_duration_s, what, setting)
    # Packets end where the last one starts (a video frame short); where the header agrees
    # within half a second it is the more exact figure.
    if abs(info.duration_s - measured) > HEADER_TOLERANCE_S:
        info = replace(info, duration_s=measured)
    return info


def measure_duration(path: str | Path, max_duration_s: float, what: str, setting: str) -> float:
    """The duration of ``path``'s first video and audio streams from their packets (stream
    copy to nowhere: demuxing only, no decoding); InvalidInput past ``max_duration_s``."""
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *INPUT_GUARD, "-i", str(path),
           "-map", "0:v:0?", "-map", "0:a:0?", "-c", "copy", "-t", f"{max_duration_s + 1:.3f}",
           "-f", "null", "-", "-progress", "pipe:1", "-nostats"]
    proc = processes.run(cmd, timeout=600)
    if proc.returncode != 0:
        raise InvalidInput(f"{what} could not be read to its end ({_short(proc.stderr, path, what)})")
    times = [line.split("=", 1)[1] for line in proc.stdout.decode(errors="replace").splitlines()
             if line.startswith("out_time_us=")]
    measured = max((int(t) for t in times if t.strip().lstrip("-").isdigit()), default=0) / 1e6
    if measured > max_duration_s:
        raise too_long(what, max_duration_s, setting)
    return measured


def _probe_header(path: str | Path, what: str) -> MediaInfo:
    if Path(path).stat().st_size == 0:
        raise InvalidInput(f"{what} is empty (0 bytes)")
    cmd = ["ffprobe", "-hide_banner", "-loglevel", "error", *INPUT_GUARD,
           "-show_format", "-show_streams", "-of", "json", str(path)]
    proc = processes.run(cmd, timeout=60)
    if proc.returncode != 0:
        raise InvalidInput(f"{what} is not a media file we can read ({_short(proc.stderr, path, what)})")
    info = json.loads(proc.stdout or b"{}")
    fmt = info.get("format", {})
    streams = info.get("streams", [])
    video = [s for s in streams if s.get("codec_type") == "video"
             and not s.get("disposition", {}).get("attached_pic")]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not video and not audio:
        raise InvalidInput(f"{what} has no audio or video stream")
    duration = float(fmt.get("duration") or 0.0)
    return MediaInfo(
        format_name=str(fmt.get("format_name", "")),
        duration_s=duration,
        has_video=bool(video),
        has_audio=bool(audio),
        audio_sample_rate=int(audio[0].get("sample_rate", 0)) if audio else 0,
        audio_channels=int(audio[0].get("channels", 0)) if audio else 0,
        video_codec=str(video[0].get("codec_name", "")) if video else "",
        audio_codec=str(audio[0].get("codec_name", "")) if audio else "",
    )


def _decoded_pieces(path: str | Path, sample_rate: int, channels: int, sample_format: str, piece_bytes: int,
                    what: str, max_duration_s: float | None) -> Generator[bytes, None, None]:
    """The first audio stream as raw PCM (ffmpeg's ``sample_format``: f32le, s16le) from a
    pipe, in pieces of ``piece_bytes`` (the last shorter); ffmpeg stops a second past
    ``max_duration_s``. Closing the generator early stops ffmpeg."""
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *INPUT_GUARD, "-i", str(path),
           "-map", "0:a:0", "-vn", "-ac", str(channels), "-ar", str(sample_rate)]
    if max_duration_s is not None:
        cmd += ["-t", f"{max_duration_s + 1.0:.3f}"]
    cmd += ["-f", sample_format, "pipe:1"]
    # stderr goes to a file: a corrupt stream can log more than a pipe holds, and nobody
    # would read the pipe while stdout is being drained.
    with tempfile.TemporaryFile() as errors, processes.child(cmd, stdout=subprocess.PIPE, stderr=errors) as proc:
        assert proc.stdout is not None
        try:
            while True:
                data = proc.stdout.read(piece_bytes)
                if data:
                    yield data
                if len(data) < piece_bytes:
                    break
            returncode = proc.wait(timeout=3600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors.seek(0)
        stderr = errors.read(1 << 16)
    if returncode != 0:
        raise InvalidInput(f"could not decode the audio of {what} ({_short(stderr, path, what)})")


def decode_audio_blocks(path: str | Path, sample_rate: int, channels: int, block: int,
                        what: str = "input") -> Generator[np.ndarray, None, None]:
    """The first audio stream as float32 blocks of ``block`` frames (the last shorter), for a
    pass over a long file that never holds all of it."""
    frame = 4 * channels
    with contextlib.closing(_decoded_pieces(path, sample_rate, channels, "f32le", block * frame, what,
                                            None)) as pieces:
        for data in pieces:
            usable = len(data) - len(data) % frame
            if usable:
                yield np.frombuffer(data[:usable], dtype="<f4").reshape(-1, channels)


def decode_pcm(path: str | Path, sample_rate: int, piece_bytes: int, what: str = "input",
               max_duration_s: float | None = None, setting: str = "MAX_DURATION_S") -> Generator[bytes, None, None]:
    """The first audio stream as mono 16-bit PCM from a pipe, in pieces of ``piece_bytes``
    (whole frames), for a caller that sends it on rather than keep it: nothing on disk.

    With ``max_duration_s``, audio longer than it (a header can lie) is refused
    (InvalidInput) the moment the pieces pass it."""
    limit = None if max_duration_s is None else 2 * int(max_duration_s * sample_rate + 1)
    sent = 0
    with contextlib.closing(_decoded_pieces(path, sample_rate, 1, "s16le", piece_bytes - piece_bytes % 2, what,
                                            max_duration_s)) as pieces:
        for data in pieces:
            sent += len(data)
            if limit is not None and sent > limit:
                assert max_duration_s is not None
                raise too_long(what, max_duration_s, setting)
            yield data[: len(data) - len(data) % 2]
    if sent < 2:
        raise InvalidInput(f"{what} has no audio samples")


def decode_audio_to_files(path: str | Path, outputs: Sequence[tuple[Path, int]], what: str = "input",
                          max_duration_s: float | None = None, setting: str = "MAX_DURATION_S") -> int:
    """The first audio stream decoded once (one ffmpeg reads the file) into mono 16-bit files,
    one per ``(path, sample_rate)``; returns the frames in the first. Memory holds none of it.

    With ``max_duration_s``, ffmpeg stops a second past it, and audio longer than it (a
    header can lie) is refused (InvalidInput) with the files removed.
    """
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *INPUT_GUARD, "-i", str(path)]
    for target, rate in outputs:
        cmd += ["-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(rate)]
        if max_duration_s is not None:
            cmd += ["-t", f"{max_duration_s + 1.0:.3f}"]
        cmd += ["-f", "s16le", "-y", str(target)]
    try:
        done = processes.run(cmd, timeout=4 * 3600)
        if done.returncode != 0:
            raise InvalidInput(f"could not decode the audio of {what} ({_short(done.stderr, path, what)})")
        first, rate = outputs[0]
        frames = first.stat().st_size // 2
        if not frames:
            raise InvalidInput(f"{what} has no audio samples")
        if max_duration_s is not None and frames > int(max_duration_s * rate + 1):
            raise too_long(what, max_duration_s, setting)
        return frames
    except BaseException:
        for target, _ in outputs:
            target.unlink(missing_ok=True)
        raise


def decode_audio(path: str | Path, sample_rate: int, channels: int, what: str = "input",
                 max_duration_s: float | None = None, setting: str = "MAX_DURATION_S") -> np.ndarray:
    """Decode the first audio stream to float32 frames of shape (n, channels).

    With ``max_duration_s``, samples are counted as they are decoded and ffmpeg is stopped
    the moment they pass the limit (InvalidInput): memory never holds more than the limit.
    """
    limit = None if max_duration_s is None else int(max_duration_s * sample_rate + 1)
    data = bytearray()
    # Closed on the way out, so ffmpeg is stopped the moment the limit is passed.
    with contextlib.closing(decode_audio_blocks(path, sample_rate, channels, (1 << 20) // (4 * channels),
                                                what)) as blocks:
        for block in blocks:
            data += block.tobytes()
            if limit is not None and len(data) > limit * 4 * channels:
                assert max_duration_s is not None
                raise too_long(what, max_duration_s, setting)
    if not data:
        raise InvalidInput(f"{what} has no audio samples")
    return np.frombuffer(data, dtype="<f4").reshape(-1, channels)
