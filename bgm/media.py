"""ffmpeg, locked down for untrusted input.

Every ffmpeg/ffprobe call on user media passes ``-protocol_whitelist file,pipe`` and a
demuxer allow-list, so a crafted file (an HLS playlist, a concat list, ...) can never make
ffmpeg open another file or the network: such formats are refused before they are opened.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def require_ffmpeg() -> None:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (Debian: apt-get install ffmpeg)")


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


def _short(stderr: bytes) -> str:
    lines = [ln for ln in stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no detail"


def probe(path: str | Path, what: str = "input") -> MediaInfo:
    """Describe a media file, or raise InvalidInput if it is not one we accept."""
    if Path(path).stat().st_size == 0:
        raise InvalidInput(f"{what} is empty (0 bytes)")
    cmd = ["ffprobe", "-hide_banner", "-loglevel", "error", *INPUT_GUARD,
           "-show_format", "-show_streams", "-of", "json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise InvalidInput(f"{what} is not a media file we can read ({_short(proc.stderr)})")
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


def decode_audio(path: str | Path, sample_rate: int, channels: int, what: str = "input") -> np.ndarray:
    """Decode the first audio stream to float32 frames of shape (n, channels)."""
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *INPUT_GUARD, "-i", str(path),
           "-map", "0:a:0", "-vn", "-ac", str(channels), "-ar", str(sample_rate), "-f", "f32le", "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True, timeout=3600)
    if proc.returncode != 0:
        raise InvalidInput(f"could not decode the audio of {what} ({_short(proc.stderr)})")
    samples = np.frombuffer(proc.stdout, dtype="<f4")
    if samples.size == 0:
        raise InvalidInput(f"{what} has no audio samples")
    return samples.reshape(-1, channels).copy()
