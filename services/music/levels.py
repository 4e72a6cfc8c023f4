"""Every span audible: each span's music brought to one loudness, whatever made it.

Backends render emotions at very different levels (the composer's sadness came out 15 LU
under its joy, and the mixer then placed the whole bed by its overall loudness, so sad
spans ended about 31 LU under the speech). Here each span is measured (ITU-R BS.1770) and
set to ``SPAN_LUFS`` plus a small deliberate offset by emotion, and the gain glides over
``GLIDE_S`` around each join, so the level never jumps at a change of emotion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bgm import vocab
from bgm.loudness import loudness

SPAN_LUFS = -20.0
# Deliberate, small: calm moods sit a little under, energetic ones a little over (at most
# ±1.5 LU, so two neighbouring spans differ by at most 3 LU).
EMOTION_OFFSET_LU = {
    vocab.JOY: 1.0, vocab.SURPRISE: 1.0, vocab.ANGER: 1.5, vocab.NEUTRAL: 0.0,
    vocab.DISGUST: -0.5, vocab.FEAR: -1.0, vocab.SADNESS: -1.5,
}
GLIDE_S = 0.5
MAX_GAIN_DB = 30.0  # a near-silent span (a fade, a rest) is not blown up into noise
PEAK = 0.89  # the whole track's sample peak after levelling (headroom for the mixer)


def intensity_offset_lu(intensity: float | None) -> float:
    """A creator's intensity (0..1) as a level offset: 0.5 (or unset) adds nothing, 0 and 1 are
    6 LU under and over."""
    return 0.0 if intensity is None else (intensity - 0.5) * 12.0


def level_span(piece: np.ndarray, emotion: str, rate: int, intensity: float | None = None) -> np.ndarray:
    """One span's music at its target loudness, its sample peak at most ``PEAK`` (a span that
    stands alone: its own edges fade, so no glide is needed)."""
    measured = loudness(piece, rate) if piece.shape[0] else -120.0
    gain_db = 0.0
    if measured > -70:
        target = SPAN_LUFS + EMOTION_OFFSET_LU.get(emotion, 0.0) + intensity_offset_lu(intensity)
        gain_db = float(np.clip(target - measured, -MAX_GAIN_DB, MAX_GAIN_DB))
    out = piece * np.float32(10.0 ** (gain_db / 20.0))
    peak = float(np.abs(out).max(initial=0.0))
    if peak > PEAK:
        out *= PEAK / peak
    return out.astype(np.float32)


def span_gains_db(music: np.ndarray, spans: Sequence[tuple[str, float, float]], rate: int) -> list[float]:
    """The gain (dB) that brings each span to its target loudness."""
    gains = []
    for emotion, start, end in spans:
        piece = music[round(start * rate) : round(end * rate)]
        measured = loudness(piece, rate) if piece.shape[0] else -120.0
        if measured <= -70:
            gains.append(0.0)  # silence stays silence
            continue
        target = SPAN_LUFS + EMOTION_OFFSET_LU.get(emotion, 0.0)
        gains.append(float(np.clip(target - measured, -MAX_GAIN_DB, MAX_GAIN_DB)))
    return gains


def gain_curve(gains_db: Sequence[float], spans: Sequence[tuple[str, float, float]], n: int, rate: int) -> np.ndarray:
    """Per-sample gain (linear): each span's gain, gliding linearly in dB across each join."""
    knots_t: list[float] = []
    knots_db: list[float] = []
    for i, ((_, start, end), gain) in enumerate(zip(spans, gains_db, strict=True)):
        half = min(GLIDE_S / 2, (end - start) / 4)
        knots_t += [start + (half if i else 0.0), end - (half if i < len(spans) - 1 else 0.0)]
        knots_db += [gain, gain]
    t = np.arange(n) / rate
    return np.asarray(10.0 ** (np.interp(t, knots_t, knots_db) / 20.0), dtype=np.float32)


def level_spans(music: np.ndarray, spans: Sequence[tuple[str, float, float]], rate: int) -> np.ndarray:
    """``music`` (n, channels) with every span at its target loudness, joins glided."""
    gains = span_gains_db(music, spans, rate)
    out = music * gain_curve(gains, spans, music.shape[0], rate)[:, None]
    peak = float(np.abs(out).max(initial=0.0))
    if peak > PEAK:  # one gain for the whole track keeps the spans' balance
        out *= PEAK / peak
    return out.astype(np.float32)
