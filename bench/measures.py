"""What a listener hears in a remix, measured against the parts the input was built from.

Everything is at 48 kHz mono unless said. Regions come from when the input's speech was
laid (``talking``): *pauses* are the gaps between utterances, 0.3 s in from each side so the
fades at speech edges are left out; *under speech* is the voiced part of each utterance
(20 ms frames within 30 dB of the speech's loud frames).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.signal import stft

from services.mixer import dsp

RATE = 48_000
NPERSEG, HOP = 2048, 512
EDGE_S = 0.3
MIN_PAUSE_S = 1.0


def regions(talking: Sequence[tuple[float, float]], speech: np.ndarray, n: int, hop: int,
            interior: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (pause, voiced) per hop-sized frame of an n-sample signal; ``interior``: only
    the pauses between utterances (the lead-in and the tail hold the music's fades)."""
    frames = -(-n // hop)
    t = (np.arange(frames) + 0.5) * hop / RATE
    pause = np.zeros(frames, dtype=bool)
    bounds = [0.0, *[x for span in talking for x in span], n / RATE]
    if interior:
        bounds = bounds[2:-2]
    for start, end in zip(bounds[::2], bounds[1::2], strict=True):
        if end - start >= MIN_PAUSE_S:
            pause |= (t >= start + EDGE_S) & (t <= end - EDGE_S)
    inside = np.zeros(frames, dtype=bool)
    for start, end in talking:
        inside |= (t >= start) & (t <= end)
    padded = np.pad(speech[:n], (0, frames * hop - min(n, speech.shape[0])))
    level = frame_db(padded, hop)
    voiced = inside & (level > np.percentile(level[inside], 95) - 30.0) if inside.any() else inside
    return pause, voiced


def align(output: np.ndarray, reference: np.ndarray, max_lag: int = 4096) -> int:
    """Samples by which ``output`` lags ``reference`` (cross-correlation of the first 20 s)."""
    m = min(output.shape[0], reference.shape[0], 20 * RATE)
    a, b = output[:m], reference[:m]
    size = 1 << int(np.ceil(np.log2(2 * m)))
    corr = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.concatenate([corr[: max_lag + 1], corr[-max_lag:]])
    best = int(np.argmax(lags))
    return best if best <= max_lag else best - 2 * max_lag - 1


def shift(x: np.ndarray, lag: int) -> np.ndarray:
    """``x`` moved ``lag`` samples earlier (positive lag) or later, same length."""
    if lag > 0:
        return np.pad(x[lag:], (0, lag))
    if lag < 0:
        return np.pad(x, (-lag, 0))[: x.shape[0]]
    return x


def _spec(x: np.ndarray) -> np.ndarray:
    return stft(x, fs=RATE, nperseg=NPERSEG, noverlap=NPERSEG - HOP, boundary=None, padded=True)[2]


def fitted_power(output: np.ndarray, parts: dict[str, np.ndarray], frames: np.ndarray) -> dict[str, float]:
    """Least-squares fit of ``output`` onto ``parts`` per frequency bin over the chosen STFT
    frames (a complex gain per bin and part, so a part the mixer filtered is still found);
    returns each fitted part's mean power per frame, and ``residual`` for what none explains."""
    y = _spec(output)
    xs = [_spec(p) for p in parts.values()]
    count = min(y.shape[1], *(x.shape[1] for x in xs), frames.shape[0])
    sel = np.flatnonzero(frames[:count])
    if sel.size == 0:
        return {name: float("nan") for name in [*parts, "residual"]}
    Y = y[:, sel]  # (bins, t)
    X = np.stack([x[:, sel] for x in xs], axis=-1)  # (bins, t, parts)
    gram = np.einsum("btp,btq->bpq", X.conj(), X)
    gram += np.eye(len(xs))[None] * (1e-9 * np.trace(gram, axis1=1, axis2=2).real[:, None, None] + 1e-20)
    coef = np.linalg.solve(gram, np.einsum("btp,bt->bp", X.conj(), Y)[..., None])[..., 0]  # (bins, parts)
    out = {}
    for i, name in enumerate(parts):
        out[name] = float((np.abs(coef[:, None, i] * X[:, :, i]) ** 2).sum(axis=0).mean())
    residual = Y - np.einsum("bp,btp->bt", coef, X)
    out["residual"] = float((np.abs(residual) ** 2).sum(axis=0).mean())
    return out


def db(ratio: float) -> float:
    return float(10 * np.log10(max(ratio, 1e-30)))


def bed_levels(output: np.ndarray, speech: np.ndarray, bed: np.ndarray, music: np.ndarray,
               talking: Sequence[tuple[float, float]]) -> dict[str, float]:
    """The old bed's level in ``output`` relative to the speech (dB): in pauses and under speech.

    ``music`` is the new music as mixed (the mixer's BGM stem): a part of the fit, so it is not
    taken for the old bed. ``pause_rest_db`` is everything in the pauses that is not the new
    music (old bed, noise, artefacts) relative to the speech: an upper bound for the bed.
    """
    pause, voiced = regions(talking, speech, output.shape[0], HOP)
    # STFT frame i covers samples [i*HOP, i*HOP+NPERSEG): take its region at its centre.
    centre = np.minimum((np.arange(pause.shape[0]) * HOP + NPERSEG // 2) // HOP, pause.shape[0] - 1)
    pause, voiced = pause[centre], voiced[centre]
    under = fitted_power(output, {"speech": speech, "bed": bed, "music": music}, voiced)
    gaps = fitted_power(output, {"bed": bed, "music": music}, pause)
    return {
        "bed_pause_db": db(gaps["bed"] / under["speech"]),
        "bed_under_speech_db": db(under["bed"] / under["speech"]),
        "pause_rest_db": db((gaps["bed"] + gaps["residual"]) / under["speech"]),
    }


def frame_db(x: np.ndarray, hop: int) -> np.ndarray:
    frames = x.shape[0] // hop
    return 10 * np.log10((x[: frames * hop].reshape(frames, hop) ** 2).mean(axis=1) + 1e-12)


def ducking_db(music: np.ndarray, speech: np.ndarray, talking: Sequence[tuple[float, float]],
               window_s: float = 0.1) -> float:
    """Median music level over pause windows minus median over voiced windows (dB); pauses
    between utterances only (NaN where there are none)."""
    hop = int(window_s * RATE)
    levels = frame_db(music, hop)
    pause, voiced = regions(talking, speech, levels.shape[0] * hop, hop, interior=True)
    if not pause.any() or not voiced.any():
        return float("nan")
    return float(np.median(levels[pause[: levels.shape[0]]]) - np.median(levels[voiced[: levels.shape[0]]]))


def span_loudness(music: np.ndarray, spans: Sequence[tuple[float, float]], speech: np.ndarray,
                  talking: Sequence[tuple[float, float]], fades_s: tuple[float, float] = (0.0, 0.0)
                  ) -> list[tuple[float, float]]:
    """Per (start, end) span, the integrated loudness (LUFS) of ``music`` in the span's pauses
    (the music's own level) and under its speech (ducked): NaN where the span has less than
    0.5 s of either. The programme's fade-in and fade-out (``fades_s``) are left out, so a
    span is compared with another in the same state, never a faded or ducked part with a
    free one."""
    hop = RATE // 100
    n = music.shape[0]
    pause, voiced = regions(talking, speech, n, hop)
    steady = np.zeros(n, dtype=bool)
    steady[int(fades_s[0] * RATE) : n - int(fades_s[1] * RATE)] = True
    out = []
    for a, b in spans:
        lo, hi = int(a * RATE), int(b * RATE)
        levels = []
        for region in (pause, voiced):
            inside = np.repeat(region, hop)[:n][lo:hi] & steady[lo:hi]
            piece = music[lo:hi][inside]
            levels.append(dsp.loudness(piece) if piece.shape[0] >= RATE // 2 else float("nan"))
        out.append((levels[0], levels[1]))
    return out


def spread_and_lowest(levels: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """From ``span_loudness``: the largest spread between spans in one state (pauses, or under
    speech), and the lowest span, each span taken at its own level (in its pauses) where it
    has pauses, else ducked (under its speech)."""
    spreads = [0.0]
    for state in zip(*levels, strict=True):
        known = [x for x in state if not np.isnan(x)]
        if known:
            spreads.append(max(known) - min(known))
    own = [under if np.isnan(pause) else pause for pause, under in levels]
    return max(spreads), min((x for x in own if not np.isnan(x)), default=float("nan"))


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    n = min(estimate.shape[0], reference.shape[0])
    s, e = reference[:n].astype(np.float64), estimate[:n].astype(np.float64)
    alpha = float(np.dot(e, s) / (np.dot(s, s) + 1e-12))
    target = alpha * s
    return db(float(np.dot(target, target)) / (float(np.dot(e - target, e - target)) + 1e-12))


_PUNCT = re.compile(r"[^a-z0-9' ]+")


_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ORDINAL_ENDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                 "nine": "ninth", "twelve": "twelfth"}
# Whisper writes "Mr." and "20th" where a reference says "Mister" and "twentieth": the same
# word, so both are spelled out before counting.
_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor"}
_NUMBER = re.compile(r"^(\d{1,2})(st|nd|rd|th)?$")


def _number_words(n: int, ordinal: bool) -> str:
    tens, ones = divmod(n, 10)
    words = [_ONES[n]] if n < 20 else [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    if ordinal:
        last = words[-1]
        words[-1] = _ORDINAL_ENDS.get(last, last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return " ".join(words)


def _spelled(word: str) -> str:
    if word in _TITLES:
        return _TITLES[word]
    match = _NUMBER.match(word)
    return _number_words(int(match[1]), bool(match[2])) if match else word


def normalise_text(text: str) -> str:
    """Lower case, no punctuation, hyphens as spaces, titles and numbers under 100 spelled out."""
    text = text.lower().replace("-", " ")
    text = _PUNCT.sub(" ", text)
    return " ".join(_spelled(w.strip("'")) for w in text.split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words), texts normalised."""
    import jiwer

    ref = normalise_text(reference)
    out = jiwer.process_words(ref, normalise_text(hypothesis) or "<empty>")
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def video_md5(path: Path) -> str:
    """The MD5 of the picture stream's packets, copied as they are: equal means untouched."""
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-map", "0:v", "-c", "copy", "-f", "md5", "-"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout.decode().strip()
