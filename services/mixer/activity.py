"""When someone is talking, from the speech itself: Silero VAD on the separated speech,
reconciled with the transcript's word timestamps.

An energy threshold cannot tell speech from what separation leaves of the old music (that
residue sat above the old threshold in every pause, so the music never came back up). A
voice-activity model can: it scores each 32 ms window of the separated speech, and the
words Whisper heard are added where it was unsure. Two curves follow from the activity:

- the speech gate: the speech stem passes while someone talks and is faded out between,
  so what separation leaves of the old music is gone from the pauses;
- the duck: the music dips while someone talks, stays down for ``hold_ms`` after, bridges
  gaps between words so it does not pump, and rises in every real pause.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from bgm import vocab
from bgm.audio import resample
from bgm.errors import Unsupported

RATE = vocab.SEPARATION_RATE
VAD_RATE = vocab.STT_RATE  # Silero's rate, as Whisper's
WINDOW = 512  # Silero's window at 16 kHz: 32 ms
FRAME = 480  # the curves' resolution at 48 kHz: 10 ms
FRAME_S = FRAME / RATE

# Silero's own defaults: speech starts at the threshold and continues down to 0.15 under it.
HYSTERESIS = 0.15
# Shorter blips are clicks or a drum hit, not speech (unless a word is there).
MIN_SPEECH_S = 0.09
# The gate opens this much before the detected speech and closes this much after it, so
# soft onsets and word tails are kept; gaps shorter than GATE_BRIDGE_S stay open.
GATE_LEAD_S, GATE_TAIL_S, GATE_BRIDGE_S = 0.06, 0.15, 0.25
GATE_RAMP_S = 0.04
# A word from the transcript counts where the VAD gave it at least this probability.
WORD_FLOOR = 0.15
WORD_GAP_S = 0.25  # a dip inside a word (a stop consonant) the VAD hears as less sure
WORD_EDGE_S = 0.1  # a word's onset and tail, likewise
# Between words the music stays down: a gap shorter than this is not a pause.
DUCK_BRIDGE_S = 0.35


@functools.cache
def _vad_model() -> object:
    try:
        from faster_whisper.vad import get_vad_model
    except ImportError as exc:
        raise Unsupported("faster-whisper (for its Silero VAD) is not installed (pip install 'bgm[mixer]')") from exc
    return get_vad_model()


def load() -> None:
    """Open the VAD model now (at service start), not on the first request."""
    _vad_model()


def speech_probability(mono: np.ndarray) -> np.ndarray:
    """Silero's speech probability per 32 ms window of 48 kHz mono audio."""
    x = resample(np.asarray(mono, dtype=np.float32)[:, None], RATE, VAD_RATE)[:, 0]
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    padded = np.pad(x, (0, -x.shape[0] % WINDOW))
    return np.asarray(_vad_model()(padded), dtype=np.float32).reshape(-1)  # type: ignore[operator]


class Reader(Protocol):
    length: int

    def read(self, lo: int, hi: int) -> np.ndarray: ...


VAD_RUN_WINDOWS = 1000  # windows per model run when streaming (32 s of audio)
CONTEXT = 64  # samples of the previous window Silero sees with each window (faster-whisper's)
RESAMPLE_MARGIN = 600  # 48 kHz samples read either side of a block for the resampler (a multiple of 3)


class StreamedVad:
    """``speech_probability`` of a long track read in blocks (``read(lo, hi)`` gives samples
    [lo, hi) as (hi - lo, channels), silence outside the track): the same windows, model and
    state as one call on the whole track, holding 32 s at a time. faster-whisper's own call
    holds the whole track and its batch (1.5 GB on an hour of speech).

    ``advance`` runs what a track still arriving already has (the mixer runs the VAD on the
    speech while it is separated), ``finish`` the rest once it is complete."""

    def __init__(self, n_samples: int) -> None:
        self.model = _vad_model()
        self.n_samples = n_samples
        self.total16 = -(-n_samples * VAD_RATE // RATE)  # the whole track's length at 16 kHz
        self.windows = -(-self.total16 // WINDOW)
        self.step48 = VAD_RUN_WINDOWS * WINDOW * (RATE // VAD_RATE)
        self.end48 = self.windows * WINDOW * (RATE // VAD_RATE)
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.before = np.zeros(CONTEXT, dtype=np.float32)
        self.out = np.empty(self.windows, dtype=np.float32)
        self.done = 0
        self.lo = 0  # the next run's first sample at 48 kHz

    def advance(self, read: Callable[[int, int], np.ndarray], available: int, runs: int | None = None) -> int:
        """The runs (up to ``runs`` of them) whose samples and the resampler's margin lie
        within the first ``available`` samples of the track, or past its end (where ``read``
        gives silence); how many ran."""
        final = available if available < self.n_samples else None
        ran = 0
        while (self.lo < self.end48 and (runs is None or ran < runs)
               and (final is None or self.lo + self.step48 + RESAMPLE_MARGIN <= final)):
            self._run(read)
            ran += 1
        return ran

    def finish(self, read: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """The rest of the complete track; the probability per window of all of it."""
        while self.lo < self.end48:
            self._run(read)
        return self.out[: self.done]

    def _run(self, read: Callable[[int, int], np.ndarray]) -> None:
        from scipy.signal import resample_poly

        lo, hi = self.lo, self.lo + self.step48
        mono = read(lo - RESAMPLE_MARGIN, hi + RESAMPLE_MARGIN).mean(axis=1)
        x = resample_poly(mono, 1, RATE // VAD_RATE).astype(np.float32)
        margin16 = RESAMPLE_MARGIN * VAD_RATE // RATE
        first16 = lo * VAD_RATE // RATE
        x = x[margin16 : margin16 + min(self.step48 * VAD_RATE // RATE, self.windows * WINDOW - first16)]
        x[max(0, self.total16 - first16):] = 0.0  # past the track: silence, as the whole call pads it
        batch = x.reshape(-1, WINDOW)
        context = np.concatenate([self.before[None], batch[:-1, -CONTEXT:]])
        self.before = batch[-1, -CONTEXT:].copy()
        session = self.model.session  # type: ignore[attr-defined]
        output, self.h, self.c = session.run(None, {"input": np.concatenate([context, batch], axis=1),
                                                    "h": self.h, "c": self.c})
        got = np.asarray(output, dtype=np.float32).reshape(-1)
        self.out[self.done : self.done + got.shape[0]] = got
        self.done += got.shape[0]
        self.lo = hi


def streamed_speech_probability(read: Callable[[int, int], np.ndarray], n_samples: int) -> np.ndarray:
    """``speech_probability`` of a whole track read in blocks (``StreamedVad``)."""
    return StreamedVad(n_samples).finish(read)


def speech_probability_of(source: Reader) -> np.ndarray:
    """``speech_probability`` of a track read in blocks (``sources.Source``)."""
    return streamed_speech_probability(source.read, source.length)


def threshold_for(sensitivity: float) -> float:
    """The VAD threshold for a duck sensitivity in [0, 1] (0.5 gives Silero's default, 0.5)."""
    return float(np.clip(1.0 - sensitivity, 0.05, 0.95))


def frames(n_samples: int) -> int:
    return -(-n_samples // FRAME)


def detect(probability: np.ndarray, threshold: float, n_samples: int) -> np.ndarray:
    """Per 10 ms frame: speech by the VAD, with hysteresis, blips under MIN_SPEECH_S dropped."""
    n = frames(n_samples)
    if probability.size == 0:
        return np.zeros(n, dtype=bool)
    low = max(0.01, threshold - HYSTERESIS)
    active = np.zeros(probability.shape[0], dtype=bool)
    on = False
    for i, p in enumerate(probability):
        on = p >= threshold or (on and p >= low)
        active[i] = on
    # Window i covers [i, i + 1) * 32 ms; map each 10 ms frame to the window holding its centre.
    centres = (np.arange(n) + 0.5) * FRAME_S
    per_frame = active[np.minimum((centres * VAD_RATE / WINDOW).astype(int), active.shape[0] - 1)]
    return _drop_short(per_frame, round(MIN_SPEECH_S / FRAME_S))


def _runs(active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(np.int8), [0]])))
    return edges[::2], edges[1::2]


def _drop_short(active: np.ndarray, min_frames: int) -> np.ndarray:
    out = active.copy()
    for start, end in zip(*_runs(active), strict=True):
        if end - start < min_frames:
            out[start:end] = False
    return out


def talking(probability: np.ndarray, threshold: float, n_samples: int,
            words: Sequence[tuple[float, float]]) -> np.ndarray:
    """Per 10 ms frame, whether someone talks: the VAD's verdict (``detect``) with the words."""
    return add_words(detect(probability, threshold, n_samples), words, probability)


def add_words(active: np.ndarray, words: Sequence[tuple[float, float]], probability: np.ndarray) -> np.ndarray:
    """``active`` with every word set where the VAD was at least unsure (WORD_FLOOR):
    speech it missed (a whisper, a word over loud residue) still ducks the music and passes
    the gate, while a word Whisper made up over the music does not. Within a word, only
    what the VAD heard as such is set, its gaps under WORD_GAP_S filled and WORD_EDGE_S
    added either side: Whisper often stretches a word's timing over the pause after it, and
    the whole stretch held the duck and opened the gate through the pause (noise there can
    make the VAD unsure for a frame or two, not for the whole pause)."""
    out = active.copy()
    if probability.size == 0:
        return out
    for start, end in words:
        first, last = max(0, int(start / FRAME_S)), min(out.shape[0], int(np.ceil(end / FRAME_S)))
        if last <= first:
            continue
        windows = np.minimum((np.arange(first, last) * FRAME_S * VAD_RATE / WINDOW).astype(int),
                             probability.shape[0] - 1)
        heard = probability[windows] >= WORD_FLOOR
        if heard.any():
            out[first:last] |= _widened(_closed(heard, WORD_GAP_S), WORD_EDGE_S, WORD_EDGE_S)
    return out


def _closed(active: np.ndarray, gap_s: float) -> np.ndarray:
    """``active`` with every gap shorter than ``gap_s`` between two runs filled."""
    out = active.copy()
    starts, ends = _runs(active)
    for end, start in zip(ends[:-1], starts[1:], strict=True):
        if (start - end) * FRAME_S < gap_s:
            out[end:start] = True
    return out


def _widened(active: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    """Frame i is on if any frame in [i - after, i + before] is: runs start ``before_s``
    earlier and end ``after_s`` later."""
    before, after = round(before_s / FRAME_S), round(after_s / FRAME_S)
    window = before + after + 1
    counts = np.concatenate([[0], np.cumsum(np.pad(active.astype(np.int32), (after, before)))])
    return (counts[window:] - counts[:-window]) > 0


def regular_interp(values: np.ndarray, step: int, first: int, n_samples: int) -> np.ndarray:
    """``values`` placed every ``step`` samples from sample ``first``, linearly interpolated to
    ``n_samples`` (held flat before the first and after the last), in float32: what
    ``np.interp`` gives for regular knots, in a fraction of its time on a long programme."""
    values = np.asarray(values, dtype=np.float32)
    out = np.empty(n_samples, dtype=np.float32)
    if values.size == 0:
        out[:] = 0.0
        return out
    head = min(first, n_samples)
    out[:head] = values[0]
    done = head
    if values.size > 1 and done < n_samples:
        frac = np.arange(step, dtype=np.float32) / np.float32(step)
        block = max(1, 2**20 // step)  # knots per pass: bounded temporaries
        for k in range(0, values.size - 1, block):
            v0 = values[k : k + block + 1]
            ramp = (v0[:-1, None] + (v0[1:] - v0[:-1])[:, None] * frac[None, :]).ravel()
            take = min(ramp.size, n_samples - done)
            out[done : done + take] = ramp[:take]
            done += take
            if done >= n_samples:
                break
    out[done:] = values[-1]
    return out


def interp_block(values: np.ndarray, step: int, first: int, lo: int, hi: int) -> np.ndarray:
    """``regular_interp(values, step, first, n)[lo:hi]`` without the rest of the programme."""
    m = values.shape[0]
    k0 = min(max(0, (lo - first) // step), max(0, m - 1))
    k1 = max(k0 + 1, min(m, (hi - first) // step + 2))
    start = first + k0 * step
    if start <= lo:
        skip = lo - start
        return regular_interp(values[k0:k1], step, 0, skip + hi - lo)[skip:]
    return regular_interp(values[k0:k1], step, start - lo, hi - lo)


def to_samples(per_frame: np.ndarray, n_samples: int) -> np.ndarray:
    """A per-frame curve interpolated to samples (values at frame centres)."""
    return regular_interp(per_frame, FRAME, FRAME // 2, n_samples)


def frames_to_block(per_frame: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``to_samples(per_frame, n)[lo:hi]``."""
    return interp_block(per_frame, FRAME, FRAME // 2, lo, hi)


def gate_frames(active: np.ndarray) -> np.ndarray:
    """Per frame, the speech stem's gain: 1 while someone talks, 0 between, with raised-cosine
    ramps of GATE_RAMP_S that lie outside the kept speech (no clicks, no lost onsets)."""
    open_ = _widened(_closed(active, GATE_BRIDGE_S), GATE_LEAD_S + GATE_RAMP_S / 2, GATE_TAIL_S + GATE_RAMP_S / 2)
    ramp = max(1, round(GATE_RAMP_S / FRAME_S))
    soft = np.convolve(open_.astype(np.float32), np.ones(ramp, dtype=np.float32) / ramp, mode="same")
    return np.asarray(0.5 - 0.5 * np.cos(np.pi * np.clip(soft, 0.0, 1.0)), dtype=np.float32)


def gate(active: np.ndarray, n_samples: int) -> np.ndarray:
    """``gate_frames`` per sample."""
    return to_samples(gate_frames(active), n_samples)


def ducking(active: np.ndarray, hold_ms: float) -> np.ndarray:
    """Per frame: the music should be down (speech, gaps between words, and ``hold_ms`` after)."""
    return _widened(_closed(active, DUCK_BRIDGE_S), 0.0, hold_ms / 1000.0)
