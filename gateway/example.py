"""The example video: colour bars, espeak-ng speech with an emotional arc, and a music bed
(the "old music" the remix replaces). Everything is generated, so there is no licence to mind."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# About ten seconds each at espeak-ng's default speed.
SCRIPT = (
    ("joy", "What a wonderful day! I am so happy and excited. We won the award, "
            "and I love this amazing team so much!"),
    ("sadness", "But then I heard that my old friend died. I miss him terribly, "
                "and I feel so sad and lonely. I cried all night."),
    ("anger", "And now they cancelled our project for no reason! I am furious. "
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


def music_bed() -> Path | None:
    try:
        import immich_memories_music
    except ImportError:
        return None
    tracks = sorted(Path(immich_memories_music.__file__).parent.glob("tracks/calm/*.opus"))
    return tracks[0] if tracks else None


def make_example(out: Path, section_s: float = 10.0, script: tuple[tuple[str, str], ...] = SCRIPT,
                 music: bool = True) -> Path:
    """Write an H.264/AAC MP4 of len(script) * section_s seconds (``music=False``: speech alone)."""
    duration = section_s * len(script)
    with tempfile.TemporaryDirectory(prefix="bgm-example-") as tmp_name:
        tmp = Path(tmp_name)
        parts = []
        for i, (_, text) in enumerate(script):
            wav = tmp / f"line{i}.wav"
            speak(text, wav)
            padded = tmp / f"padded{i}.wav"
            # Half a second of silence before each line, then pad the section to its length.
            _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(wav), "-af",
                  f"adelay=500,apad=whole_dur={section_s}", "-t", str(section_s),
                  "-ar", "48000", "-ac", "1", str(padded)])
            parts.append(padded)
        speech = tmp / "speech.wav"
        inputs = [arg for p in parts for arg in ("-i", str(p))]
        _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", *inputs, "-filter_complex",
              f"concat=n={len(parts)}:v=0:a=1", str(speech)])
        bed = music_bed()
        bed_args = (["-stream_loop", "-1", "-i", str(bed)] if bed else
                    ["-f", "lavfi", "-i", f"sine=frequency=220:duration={duration}"])
        bed_level = 0.25 if music else 0.0
        out.parent.mkdir(parents=True, exist_ok=True)
        _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error",
              "-f", "lavfi", "-i", f"smptebars=size=640x360:rate=25:duration={duration}",
              "-i", str(speech), *bed_args,
              "-filter_complex", f"[2:a]volume={bed_level},aresample=48000[bed];[1:a][bed]amix=inputs=2:duration=first:"
              "normalize=0[a]",
              "-map", "0:v", "-map", "[a]", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
              "-c:a", "aac", "-b:a", "128k", "-t", str(duration), "-metadata", "title=bgm example",
              "-movflags", "+faststart", str(out)])
    return out
