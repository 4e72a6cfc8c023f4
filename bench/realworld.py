"""Test inputs built from ``../shared/realworld``: real speech, re-spaced with pauses, over a
real music bed at a chosen level, written as a small MP4, with every part kept for measuring.

The files are read where they lie (never copied into the repository). Each recording is cut
into utterances at its silent gaps and laid out again with 2-3 s pauses between them, so
ducking and gating have real pauses to act in; the bed is the one the manifest names for
that recording, from its offset, ``bed_lu`` loudness units under the speech.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from bench import measures
from bgm import audio, media
from services.mixer import dsp

RATE = 48_000
ROOT = Path(os.environ.get("BGM_REALWORLD", Path(__file__).resolve().parents[2] / "shared" / "realworld"))


@dataclass(frozen=True)
class Case:
    name: str
    video: Path
    speech: np.ndarray  # (n,) the clean speech as laid out, 48 kHz
    bed: np.ndarray  # (n,) the old music as mixed in
    talking: list[tuple[float, float]]  # (start, end) seconds of each utterance
    reference: str  # what is said
    bed_lu: float  # how far the bed sits under the speech (LU)


def available() -> bool:
    return (ROOT / "manifest.json").is_file()


def manifest() -> dict:
    return json.loads((ROOT / "manifest.json").read_text())


def load(path: Path) -> np.ndarray:
    return media.decode_audio(path, RATE, 1, path.name)[:, 0]


def utterances(speech: np.ndarray, min_gap_s: float = 0.15, min_len_s: float = 0.8) -> list[np.ndarray]:
    """The recording cut at its gaps: 20 ms frames 35 dB under the loud ones, or within 8 dB
    of the noise floor (the 1961 broadcast's crowd never falls silent)."""
    frame = RATE // 50
    level = measures.frame_db(speech, frame)
    voiced = level > max(np.percentile(level, 95) - 35.0, np.percentile(level, 20) + 8.0)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], voiced.astype(np.int8), [0]])))
    runs = [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged: list[list[int]] = []
    for run in runs:
        if merged and (run[0] - merged[-1][1]) * frame < min_gap_s * RATE:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    # Too-short pieces (a breath, a click) join their neighbour instead of standing alone.
    pieces: list[list[int]] = []
    for run in merged:
        short = (run[1] - run[0]) * frame < min_len_s * RATE
        if pieces and (short or (pieces[-1][1] - pieces[-1][0]) * frame < min_len_s * RATE):
            pieces[-1][1] = run[1]
        else:
            pieces.append(run)
    pad = int(0.08 * RATE)  # keep the soft onsets and tails the threshold cuts off
    return [speech[max(0, a * frame - pad) : min(speech.shape[0], b * frame + pad)] for a, b in pieces]


def lay_out(parts: list[np.ndarray], rng: np.random.Generator, lead_s: float = 1.5,
            tail_s: float = 2.0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    pieces = [np.zeros(int(lead_s * RATE), dtype=np.float32)]
    talking = []
    at = pieces[0].shape[0]
    for i, part in enumerate(parts):
        talking.append((at / RATE, (at + part.shape[0]) / RATE))
        pieces.append(part.astype(np.float32))
        at += part.shape[0]
        gap = int((tail_s if i == len(parts) - 1 else rng.uniform(2.0, 3.0)) * RATE)
        pieces.append(np.zeros(gap, dtype=np.float32))
        at += gap
    return np.concatenate(pieces), talking


def bed_under(speech: np.ndarray, bed_file: Path, offset_s: float, bed_lu: float) -> np.ndarray:
    music = load(bed_file)[int(offset_s * RATE):]
    reps = -(-speech.shape[0] // max(1, music.shape[0]))
    music = np.tile(music, reps)[: speech.shape[0]]
    gain = dsp.db_to_gain(dsp.loudness(speech) - bed_lu - dsp.loudness(music))
    return (music * gain).astype(np.float32)


def write_video(mixture: np.ndarray, out: Path) -> Path:
    """A small H.264/AAC MP4 (grey picture) carrying ``mixture``, as a creator would upload."""
    wav = out.with_suffix(".wav")
    peak = float(np.abs(mixture).max())
    if peak > 0.99:
        raise ValueError(f"the test mixture clips (peak {peak:.2f}); lower its level")
    soundfile.write(str(wav), mixture, RATE, subtype="FLOAT")
    duration = mixture.shape[0] / RATE
    cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error",
           "-f", "lavfi", "-i", f"color=c=gray:size=320x180:rate=25:duration={duration:.3f}",
           "-i", str(wav), "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "192k", "-t", f"{duration:.3f}", str(out)]
    proc = subprocess.run(cmd, capture_output=True)
    wav.unlink()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-400:])
    return out


def build(entry: dict, bed_lu: float, folder: Path, seed: int = 0, level_lufs: float = -23.0) -> Case:
    """One manifest speech entry re-spaced with pauses, over its bed ``bed_lu`` under it."""
    clean = load(ROOT / entry["file"])
    speech, talking = lay_out(utterances(clean), np.random.default_rng(seed))
    speech = (speech * dsp.db_to_gain(level_lufs - dsp.loudness(speech))).astype(np.float32)
    bed = bed_under(speech, ROOT / "music" / entry["bed"], entry.get("bed_offset_s", 0.0), bed_lu)
    name = f"{entry['id']}@{bed_lu:g}LU"
    video = write_video(speech + bed, folder / f"{name}.mp4")
    return Case(name, video, speech, bed, talking, entry["reference"], bed_lu)


def example_case(folder: Path) -> Case:
    """The project's own example video, with its speech and bed kept apart for measuring."""
    from gateway import example

    speech, bed, talking = example.tracks()
    out = folder / "example.mp4"
    example.write(speech + bed, out)
    text = " ".join(line for _, line in example.SCRIPT)
    return Case("example", out, speech, bed, talking, text,
                dsp.loudness(speech) - dsp.loudness(bed))


def cases(folder: Path, bed_levels: tuple[float, ...] = (12.0, 6.0), ids: tuple[str, ...] | None = None,
          example: bool = True) -> list[Case]:
    out = []
    for entry in manifest()["english_speech"]:
        if ids is not None and entry["id"] not in ids:
            continue
        out += [build(entry, lu, folder) for lu in bed_levels]
    if example:
        out.append(example_case(folder))
    return out


def resample_to(x: np.ndarray, rate: int) -> np.ndarray:
    return audio.resample(x[:, None], RATE, rate)[:, 0]
