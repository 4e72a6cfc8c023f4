"""The example video: colour bars, espeak-ng speech with an emotional arc, and a music bed
(the "old music" the remix replaces). Everything is generated, so there is no licence to mind."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bgm import vocab

# About ten seconds each at espeak-ng's default speed.
SCRIPT = (
    (vocab.JOY, "What a wonderful day! I am so happy and excited. We won the award, "
            "and I love this amazing team so much!"),
    (vocab.SADNESS, "But then I heard that my old friend died. I miss him terribly, "
                "and I feel so sad and lonely. I cried all night."),
    (vocab.ANGER, "And now they cancelled our project for no reason! I am furious. "
              "This is outrageous and unfair, and I am so angry at them!"),
)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.decode(errors='replace')[-400:]}")


def speak(text: str, path: Path, voice: str = "en-us", speed: int = 150) -> None:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    _run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text])


RATE = vocab.SEPARATION_RATE
BED_LEVEL = 0.25  # the old music's amplitude in the example


def music_bed() -> Path | None:
    try:
        import immich_memories_music
    except ImportError:
        return None
    tracks = sorted(Path(immich_memories_music.__file__).parent.glob("tracks/calm/*.opus"))
    return tracks[0] if tracks else None


def tracks(section_s: float = 10.0, script: tuple[tuple[str, str], ...] = SCRIPT,
           music: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """The example's speech and old music (48 kHz mono, same length) and when each line is said.

    Each line starts half a second into its section and is cut at the section's end.
    """
    from bgm import media

    n = round(section_s * len(script) * RATE)
    speech = np.zeros(n, dtype=np.float32)
    talking = []
    with tempfile.TemporaryDirectory(prefix="bgm-example-") as tmp_name:
        for i, (_, text) in enumerate(script):
            wav = Path(tmp_name) / f"line{i}.wav"
            speak(text, wav)
            line = media.decode_audio(wav, RATE, 1, "espeak-ng's speech")[:, 0]
            start = round((i * section_s + 0.5) * RATE)
            end = min(start + line.shape[0], round((i + 1) * section_s * RATE), n)
            speech[start:end] = line[: end - start]
            talking.append((start / RATE, end / RATE))
    bed = np.zeros(n, dtype=np.float32)
    if music:
        source = music_bed()
        if source is not None:
            loop = media.decode_audio(source, RATE, 1, "the example's music bed")[:, 0]
            bed = np.tile(loop, -(-n // loop.shape[0]))[:n]
        else:
            bed = np.sin(2 * np.pi * 220 * np.arange(n) / RATE).astype(np.float32)
        bed = (bed * BED_LEVEL).astype(np.float32)
    return speech, bed, talking


def write(mixture: np.ndarray, out: Path) -> Path:
    """An H.264/AAC MP4 of colour bars carrying ``mixture`` (48 kHz mono)."""
    import soundfile

    duration = mixture.shape[0] / RATE
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bgm-example-") as tmp_name:
        wav = Path(tmp_name) / "audio.wav"
        soundfile.write(str(wav), mixture, RATE, subtype="FLOAT")
        _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error",
              "-f", "lavfi", "-i", f"smptebars=size=640x360:rate=25:duration={duration}", "-i", str(wav),
              "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
              "-c:a", "aac", "-b:a", "128k", "-t", str(duration), "-metadata", "title=bgm example",
              "-movflags", "+faststart", str(out)])
    return out


def make_example(out: Path, section_s: float = 10.0, script: tuple[tuple[str, str], ...] = SCRIPT,
                 music: bool = True) -> Path:
    """Write an H.264/AAC MP4 of len(script) * section_s seconds (``music=False``: speech alone)."""
    speech, bed, _ = tracks(section_s, script, music)
    return write(speech + bed, out)
