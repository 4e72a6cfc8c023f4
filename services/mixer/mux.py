"""Putting the new audio into the original container without touching the picture."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from bgm import media, processes, vocab
from bgm.errors import InvalidInput
from services.mixer import aac

# Output container and audio codec per input extension. WebM cannot hold AAC, so it gets Opus.
CONTAINERS = {
    ".mp4": ("mp4", "aac", "video/mp4"),
    ".m4v": ("mp4", "aac", "video/mp4"),
    ".mov": ("mov", "aac", "video/quicktime"),
    ".mkv": ("matroska", "aac", "video/x-matroska"),
    ".webm": ("webm", "libopus", "video/webm"),
    ".avi": ("matroska", "aac", "video/x-matroska"),
    ".ts": ("mpegts", "aac", "video/mp2t"),
}
AUDIO_ONLY = ("ipod", "aac", "audio/mp4", ".m4a")


@dataclass(frozen=True)
class Output:
    format: str
    audio_codec: str
    mime_type: str
    suffix: str


def output_for(original_name: str, info: media.MediaInfo) -> Output:
    if not info.has_video:
        return Output(*AUDIO_ONLY)
    suffix = Path(original_name).suffix.lower()
    fmt, codec, mime = CONTAINERS.get(suffix, CONTAINERS[".mkv"])
    return Output(fmt, codec, mime, suffix if suffix in CONTAINERS and suffix != ".avi" else ".mkv")


def mux(original: Path, info: media.MediaInfo, blocks: Iterable[np.ndarray], out: Output, target: Path,
        bitrate: str, rate: int = vocab.SEPARATION_RATE, channels: int = 2) -> None:
    """Copy the original's video streams, add the new audio (float (m, channels) blocks,
    piped in as they are made, encoded here), keep container metadata."""
    new_audio = ffmpeg.input("pipe:0", format="f32le", ar=rate, ac=channels)
    codec: dict[str, str | int] = {"acodec": out.audio_codec, "audio_bitrate": bitrate}
    if out.audio_codec == "aac":
        codec.update(aac.ENCODER_OPTIONS)
    _run(original, info, new_audio, codec, out, target, blocks)


def mux_encoded(original: Path, info: media.MediaInfo, encoded: aac.Stream, out: Output, target: Path) -> None:
    """Copy the original's video streams and the AAC stream already encoded (``aac``), keep
    container metadata. The stream's priming frame is skipped as an encoder's own output
    has it skipped (measured alike in MP4, MOV, Matroska and MPEG-TS)."""
    if out.audio_codec != "aac":
        raise ValueError(f"{out.format} takes {out.audio_codec}, not AAC")
    new_audio = ffmpeg.input(str(encoded.path), format="aac", itsoffset=f"{-aac.PRIMING / aac.RATE:.9f}")
    _run(original, info, new_audio, {"acodec": "copy"}, out, target, None)


def _run(original: Path, info: media.MediaInfo, new_audio: ffmpeg.nodes.FilterableStream,
         codec: dict[str, str | int], out: Output, target: Path, blocks: Iterable[np.ndarray] | None) -> None:
    guard = {"protocol_whitelist": "file,pipe", "format_whitelist": media.DEMUXER_WHITELIST}
    source = ffmpeg.input(str(original), **guard)
    streams = [new_audio.audio]
    if info.has_video:
        streams.insert(0, source["v"])
    kwargs: dict[str, str | int] = {**codec, "f": out.format, "map_metadata": 0}
    if info.has_video:
        kwargs["vcodec"] = "copy"
    if out.format in ("mp4", "mov", "ipod"):
        kwargs["movflags"] = "+faststart"
    cmd = ffmpeg.output(*streams, str(target), **kwargs).overwrite_output().compile()
    cmd = [cmd[0], "-nostats", "-hide_banner", "-loglevel", "error", *cmd[1:]]
    # stderr goes to a file: nobody reads a pipe while the audio is being written.
    with tempfile.TemporaryFile() as errors, processes.child(
            cmd, stdin=subprocess.PIPE if blocks is not None else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=errors) as proc:
        if blocks is not None:
            aac.feed(proc, blocks)
        returncode = proc.wait(timeout=3600)
        errors.seek(0)
        stderr = errors.read(1 << 16)
    if returncode != 0:
        detail = stderr.decode(errors="replace").strip().splitlines()
        last = detail[-1].replace(str(target), "the remixed file").replace(str(original), "the original")[:300] \
            if detail else "ffmpeg failed"
        raise InvalidInput(f"could not write the remixed file ({last})")
