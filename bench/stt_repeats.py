"""The repeated-lines case: lines said over and over against as many distinct lines, each
transcribed by the STT service's backend (tiny.en, beam 5, VAD, word timestamps, English).

Speech that repeats itself compresses as well as a hallucinated loop, which once sent every
30 s window through Whisper's temperature fallback (six decodings each): 120 s of repeated
lines took 58.7 s against 8.2 s for 111 s of distinct ones. Target: the repeated lines
within 1.5x the time of the distinct ones.

    python -m bench.stt_repeats [--seconds 120] [--runs 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.longform import LINES
from bgm import media
from gateway.example import speak

RATE = 16_000
GAP_S = 0.5
TARGET = 1.5


def said(texts: list[str], folder: Path) -> list[np.ndarray]:
    out = []
    for i, text in enumerate(texts):
        wav = folder / f"line{i}.wav"
        speak(text, wav)
        out.append(media.decode_audio(wav, RATE, 1, "espeak-ng's speech")[:, 0])
    return out


def joined(lines: list[np.ndarray], seconds: float) -> np.ndarray:
    """The lines in turn, GAP_S apart, cycled until ``seconds`` are filled (whole lines)."""
    gap = np.zeros(round(GAP_S * RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    total = 0
    for line in itertools.cycle(lines):
        if total >= seconds * RATE:
            break
        parts += [line, gap]
        total += line.shape[0] + gap.shape[0]
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from services.stt.backend import Options, Segment, WhisperBackend
    from services.stt.settings import SttSettings

    with tempfile.TemporaryDirectory() as tmp:
        distinct_lines = said(list(itertools.chain.from_iterable(LINES.values())), Path(tmp))
    distinct = joined(distinct_lines, args.seconds)
    repeated = joined(distinct_lines[:3], args.seconds)  # three lines, over and over
    backend = WhisperBackend(SttSettings(detect_language=False), 1)
    options = Options("transcribe", "en", True, True, 5)

    def transcribe(audio: np.ndarray) -> tuple[float, int, int]:
        started = time.perf_counter()
        found = [s for s in backend.transcribe(audio, options, threading.Event()) if isinstance(s, Segment)]
        fallbacks = len([s for s in found if s.temperature > 0])
        return time.perf_counter() - started, len(" ".join(s.text for s in found).split()), fallbacks

    transcribe(distinct_lines[0])  # the model's first call pays for its warm-up
    times: dict[str, list[float]] = {"distinct": [], "repeated": []}
    for _ in range(args.runs):  # alternated, so a slow spell of the machine hits both
        for name, audio in (("distinct", distinct), ("repeated", repeated)):
            wall, words, fallbacks = transcribe(audio)
            times[name].append(wall)
            print(f"{name:9s} {audio.shape[0] / RATE:6.1f} s of speech: {wall:6.2f} s, {words} words, "
                  f"{fallbacks} segments decoded again at a higher temperature")
    d, r = (statistics.median(times[k]) for k in ("distinct", "repeated"))
    print(f"median of {args.runs}: distinct {d:.2f} s, repeated {r:.2f} s; repeated / distinct = {r / d:.2f} "
          f"(target at most {TARGET})")


if __name__ == "__main__":
    main()
