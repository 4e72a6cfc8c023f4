"""The mix's signal processing: duck and gate curves, true peak, the limiter, codec dips
(``render`` puts them together a block at a time).

All at 48 kHz, float32, shape (n, channels). Loudness follows ITU-R BS.1770 (``bgm.loudness``);
true peak is measured on a 4x oversampled signal, as BS.1770 prescribes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d
from scipy.signal import butter, lfilter, resample_poly, sosfiltfilt

from bgm import vocab
from bgm.loudness import LoudnessMeter as LoudnessMeter  # re-exported: the mixer measures through dsp
from bgm.loudness import loudness as loudness
from services.mixer import activity

SAMPLE_RATE = vocab.SEPARATION_RATE
FRAME = activity.FRAME  # 10 ms: the duck curve runs on the speech activity's frames
# Room left under the true-peak ceiling for the lossy encoder's overshoot.
CODEC_HEADROOM_DB = 0.5


@dataclass(frozen=True)
class MixLevels:
    duck_db: float
    loudness_lufs: float
    true_peak_dbtp: float
    fade_in_s: float
    fade_out_s: float
    attack_ms: float
    release_ms: float
    bgm_gain_db: float
    duck_sensitivity: float = 0.5
    hold_ms: float = 150.0
    # How far the whole music dips under speech; only its speech band dips the full duck_db.
    # At or above duck_db the music simply dips duck_db across the spectrum.
    duck_wide_db: float = 12.0


def db_to_gain(db: float | np.ndarray) -> float | np.ndarray:
    return 10.0 ** (np.asarray(db) / 20.0)


def smooth_gain(target_db: np.ndarray, attack_ms: float, release_ms: float) -> np.ndarray:
    """One-pole smoothing of a per-frame (10 ms) gain curve in dB: fast going down (attack),
    slower coming back up (release)."""
    a_att = np.exp(-1.0 / max(1.0, attack_ms * SAMPLE_RATE / 1000 / FRAME))
    a_rel = np.exp(-1.0 / max(1.0, release_ms * SAMPLE_RATE / 1000 / FRAME))
    smoothed = np.empty_like(target_db)
    level = target_db[0] if target_db.size else 0.0
    for i, target in enumerate(target_db):
        coeff = a_att if target < level else a_rel
        level = coeff * level + (1 - coeff) * target
        smoothed[i] = level
    return smoothed


def duck_curve(talking: np.ndarray, levels: MixLevels, n: int, depth_db: float | None = None) -> np.ndarray:
    """Per-sample gain (linear) for the music from per-frame speech activity: -``depth_db``
    (default duck_db) while someone talks, between words and for ``hold_ms`` after; 0 dB in
    the pauses."""
    return activity.to_samples(duck_frames(talking, levels, depth_db), n)


def duck_frames(talking: np.ndarray, levels: MixLevels, depth_db: float | None = None) -> np.ndarray:
    """``duck_curve`` per 10 ms frame."""
    down = activity.ducking(talking, levels.hold_ms)
    lead = round(levels.attack_ms / 1000 * SAMPLE_RATE / FRAME)
    # Start dipping a little before speech begins so the first syllable is never masked.
    early = np.concatenate([down[lead:], np.zeros(min(lead, down.shape[0]), dtype=bool)]) | down
    depth = levels.duck_db if depth_db is None else depth_db
    target_db = np.where(early, -depth, 0.0).astype(np.float32)
    smoothed = smooth_gain(target_db, levels.attack_ms, levels.release_ms)
    return np.asarray(db_to_gain(smoothed), dtype=np.float32)


# Where speech is understood (most of the Speech Intelligibility Index's weight): under speech
# the music dips duck_db here and only duck_wide_db around it, so its bass and air carry on.
SPEECH_BAND_HZ = (200.0, 9000.0)
BAND_MARGIN_S = 0.25  # filter context at block edges; the band filter rings for a few ms


@functools.cache
def _speech_band_sos() -> np.ndarray:
    return np.asarray(butter(2, SPEECH_BAND_HZ, btype="bandpass", fs=SAMPLE_RATE, output="sos"))


def band_of(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The speech band of ``x[lo:hi]`` where ``x`` holds some context either side of it
    (zero-phase, so ``x[lo:hi] - band`` is the rest exactly)."""
    if x.shape[0] <= 15:  # too short for filtfilt's padding: no band to speak of
        return np.zeros_like(x[lo:hi])
    band = sosfiltfilt(_speech_band_sos(), x, axis=0)
    return np.asarray(band[lo:hi], dtype=np.float32)


def fades(n: int, fade_in_s: float, fade_out_s: float, lo: int, hi: int) -> np.ndarray | None:
    """Samples [lo, hi) of an n-sample programme's fade in and out (squared ramps); None
    where the block is clear of both."""
    fin = min(n, int(fade_in_s * SAMPLE_RATE))
    fout = min(n - fin, int(fade_out_s * SAMPLE_RATE))
    if lo >= fin and hi <= n - fout:
        return None
    at = np.arange(lo, hi, dtype=np.float64)
    gain = np.ones(hi - lo, dtype=np.float64)
    if fin:
        inside = at < fin
        gain[inside] *= (at[inside] / max(1, fin - 1)) ** 2
    if fout:
        inside = at >= n - fout
        gain[inside] *= (1.0 - (at[inside] - (n - fout)) / max(1, fout - 1)) ** 2
    return gain.astype(np.float32)


# Inter-sample peaks rise at most a few dB over the sample peaks around them, so only
# blocks whose sample peak is within this margin of what matters are oversampled.
OVERSAMPLE_MARGIN_DB = 3.0
# 10 ms blocks: on a normalised speech mix 20 % of them come near the ceiling, against 44 %
# of 100 ms blocks, and oversampling is most of what levelling a mix costs.
BLOCK = 480
CONTEXT = 64  # samples of filter context at block edges
RUN = 1000  # blocks oversampled in one call (10 s)


def channel_peak(x: np.ndarray) -> np.ndarray:
    """|x| per sample, the largest over channels (numpy's max over a short last axis is slow)."""
    if x.ndim == 1:
        return np.abs(x)
    out = np.abs(x[:, 0])
    for c in range(1, x.shape[1]):
        np.maximum(out, np.abs(x[:, c]), out=out)
    return out


def peak_envelope(x: np.ndarray, near: float) -> np.ndarray:
    """Per-sample peak (max over channels), true peak (4x oversampled, BS.1770) in blocks whose
    sample peak exceeds ``near`` (linear), plain sample peak elsewhere."""
    env = channel_peak(x)
    n = env.shape[0]
    blocks = -(-n // BLOCK)
    padded = np.pad(env, (0, blocks * BLOCK - n))
    hot_blocks = padded.reshape(blocks, BLOCK).max(axis=1) > near
    if not hot_blocks.any():
        return env
    # A block beside a hot one too: the peaks between its edge sample and the hot block's
    # first are counted at the edge sample.
    centre = hot_blocks.copy()
    hot_blocks[:-1] |= centre[1:]
    hot_blocks[1:] |= centre[:-1]
    hot = np.flatnonzero(hot_blocks)
    # Oversample each run of consecutive hot blocks in one go (at most RUN blocks at a time),
    # with filter context either side; the runs are independent, so they share the cores.
    frames = x if x.ndim == 2 else x[:, None]
    out = env.copy()
    spans = []
    for run in np.split(hot, np.flatnonzero(np.diff(hot) > 1) + 1):
        for first in range(0, run.size, RUN):
            last = int(run[min(first + RUN, run.size) - 1])
            spans.append((int(run[first]) * BLOCK, min(n, (last + 1) * BLOCK)))

    def oversample(span: tuple[int, int]) -> None:
        lo, hi = span
        ctx_lo, ctx_hi = max(0, lo - CONTEXT), min(n, hi + CONTEXT)
        over = channel_peak(resample_poly(frames[ctx_lo:ctx_hi], 4, 1, axis=0))
        per_sample = over[: (ctx_hi - ctx_lo) * 4].reshape(-1, 4).max(axis=1)
        out[lo:hi] = np.maximum(env[lo:hi], per_sample[lo - ctx_lo : hi - ctx_lo])

    list(_workers().map(oversample, spans))
    return out


@functools.cache
def _workers() -> ThreadPoolExecutor:
    # scipy's filters release the GIL, so threads use every core.
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="bgm-dsp")


def true_peak_db(x: np.ndarray) -> float:
    if x.size == 0:
        return -240.0
    sample_peak = max(float(x.max()), -float(x.min()))  # no |x| temporary: a programme is large
    near = sample_peak * float(db_to_gain(-OVERSAMPLE_MARGIN_DB))
    return 20 * np.log10(float(peak_envelope(x, near).max()) + 1e-12)


# The gain is computed per step of 8 samples (1/6 ms) and interpolated between steps: 48-sample
# steps widened the gain dips enough to cost a word in the remix WER test.
LIMITER_STEP = 8
LIMITER_RELEASE_MS = 60.0


def limit(x: np.ndarray, ceiling_db: float, release_ms: float = 60.0) -> np.ndarray:
    """Look-ahead peak limiter on the true-peak envelope, keeping peaks under the ceiling."""
    gain = limiter_gain(x, ceiling_db, release_ms)
    return x.astype(np.float32, copy=False) if gain is None else (x * gain[:, None]).astype(np.float32)


def limiter_gain(x: np.ndarray, ceiling_db: float, release_ms: float = 60.0) -> np.ndarray | None:
    """The limiter's per-sample gain for ``x`` (None where nothing needs limiting)."""
    ceiling = float(db_to_gain(ceiling_db - 0.1))
    env = peak_envelope(x, ceiling * float(db_to_gain(-OVERSAMPLE_MARGIN_DB)))
    steps = limiter_steps(env, ceiling, release_ms)
    return None if steps is None else limiter_curve(steps, env.shape[0])


def limiter_steps(env: np.ndarray, ceiling: float, release_ms: float = 60.0) -> np.ndarray | None:
    """The limiter's gain per step of LIMITER_STEP samples for a programme whose true-peak
    envelope is ``env`` (None where nothing needs limiting)."""
    return limiter_release(step_peaks(env), ceiling, release_ms)


LOOKAHEAD_STEPS = 5 * 48 // LIMITER_STEP  # 5 ms


def step_peaks(env: np.ndarray) -> np.ndarray:
    """The envelope's peak per limiter step, held over the look-ahead either side. It scales
    with the programme, so one serves every gain the programme may be given."""
    n = env.shape[0]
    steps = -(-n // LIMITER_STEP)
    return hold_steps(np.pad(env, (0, steps * LIMITER_STEP - n)).reshape(steps, LIMITER_STEP).max(axis=1))


def hold_steps(peaks: np.ndarray) -> np.ndarray:
    """The peak per limiter step held over the look-ahead either side."""
    return maximum_filter1d(peaks, size=2 * LOOKAHEAD_STEPS + 1)


def limiter_release(peaks: np.ndarray, ceiling: float, release_ms: float = 60.0) -> np.ndarray | None:
    """Gain per step from ``step_peaks``: down to the ceiling at once, back up slowly."""
    if peaks.max() <= ceiling:
        return None
    gain = np.minimum(1.0, ceiling / np.maximum(peaks, 1e-9))
    # Release: let the gain recover slowly (min-hold keeps the reduction where it is needed).
    coeff = np.exp(-1.0 / (release_ms / 1000 * SAMPLE_RATE / LIMITER_STEP))
    recovered = lfilter([1 - coeff], [1, -coeff], gain, zi=[gain[0] * coeff])[0]
    gain = np.minimum(gain, recovered)
    return -maximum_filter1d(-gain, size=2 * LOOKAHEAD_STEPS + 1)  # spread reductions both ways


def limiter_curve(steps: np.ndarray, n: int) -> np.ndarray:
    """Per-sample gain from ``limiter_steps``: interpolated between values that are never above
    either neighbouring step's, so each sample gets at most the gain its own step allows."""
    knots = np.minimum(steps, np.concatenate([steps[:1], steps[:-1]]))  # value at each step's start
    knots = np.append(knots, steps[-1])
    return activity.regular_interp(knots, LIMITER_STEP, 0, n)


def limiter_block(read: Callable[[int, int], np.ndarray], count: int, lo: int, hi: int) -> np.ndarray:
    """``limiter_curve(steps, n)[lo:hi]`` from the steps around [lo, hi) alone (``read(a, b)``
    gives ``steps[a:b]`` of ``count`` steps)."""
    first = max(0, lo // LIMITER_STEP - 1)
    last = min(count, -(-hi // LIMITER_STEP) + 2)
    near = read(max(0, first - 1), last)
    if first:
        previous, near = near[:-1], near[1:]
    else:
        previous = np.concatenate([near[:1], near[:-1]])
    knots = np.minimum(near, previous)
    if last == count:
        knots = np.append(knots, near[-1])
    return activity.interp_block(knots, LIMITER_STEP, first * LIMITER_STEP, lo, hi)


DIP_WIDTH_S = 0.05  # wide enough to cover the codec's delay and its transform blocks
DIP_MARGIN_DB = 0.3


def codec_dip_frames(frame_peaks: np.ndarray, ceiling_db: float) -> np.ndarray:
    """Per 10 ms frame, a gain that dips smoothly wherever the decoded file (whose true peak
    per frame is ``frame_peaks``, linear) went over ``ceiling_db``: by the overshoot plus a
    margin, DIP_WIDTH_S either side; 1 elsewhere.

    A codec's overshoot is local (a transient), so a local dip holds the ceiling without
    touching the programme's loudness.
    """
    ceiling = float(db_to_gain(ceiling_db))
    over_db = 20 * np.log10(np.maximum(frame_peaks, 1e-9) / ceiling)
    dip_db = np.where(over_db > 0, over_db + DIP_MARGIN_DB, 0.0)
    width = round(DIP_WIDTH_S * SAMPLE_RATE / FRAME)
    dip_db = maximum_filter1d(dip_db, size=2 * width + 1)
    # Each over-frame lies ``width`` inside its plateau, so the smoothing keeps its full depth.
    window = np.hanning(2 * width + 3)[1:-1]
    dip_db = np.convolve(dip_db, window / window.sum(), mode="same")
    return np.asarray(db_to_gain(-dip_db), dtype=np.float32)


class PeakMeter:
    """The true peak of a programme fed in blocks (each a whole number of 10 ms frames but
    the last), and its true peak per 10 ms frame: what ``true_peak_db`` and ``peak_envelope``
    give on the whole, holding one block. Blocks are measured one behind, so each has filter
    context on both sides; samples within OVERSAMPLE_MARGIN_DB of the loudest so far, or of
    ``ceiling`` (linear), are oversampled."""

    def __init__(self, ceiling: float = np.inf) -> None:
        self.ceiling_near = ceiling * float(db_to_gain(-OVERSAMPLE_MARGIN_DB))
        self.loudest = 0.0
        self.before = np.zeros((0, 2), dtype=np.float32)
        self.pending: np.ndarray | None = None
        self.frames: list[np.ndarray] = []
        self.peak = 0.0

    def feed(self, block: np.ndarray) -> None:
        if self.pending is not None:
            self._measure(self.pending, block[:CONTEXT])
        self.pending = block

    def finish(self) -> None:
        if self.pending is not None:
            self._measure(self.pending, self.pending[:0])
            self.pending = None

    def _measure(self, block: np.ndarray, after: np.ndarray) -> None:
        if block.shape[0] == 0:
            return
        self.loudest = max(self.loudest, float(channel_peak(block).max()))
        near = min(self.ceiling_near, self.loudest * float(db_to_gain(-OVERSAMPLE_MARGIN_DB)))
        window = np.concatenate([self.before, block, after]) if self.before.size or after.size else block
        env = peak_envelope(window, near)[self.before.shape[0] : self.before.shape[0] + block.shape[0]]
        self.peak = max(self.peak, float(env.max()))
        frames = -(-env.shape[0] // FRAME)
        self.frames.append(np.pad(env, (0, frames * FRAME - env.shape[0])).reshape(frames, FRAME).max(axis=1))
        self.before = block[-CONTEXT:]

    @property
    def true_peak_db(self) -> float:
        return 20 * np.log10(self.peak + 1e-12) if self.peak > 0 else -240.0

    def frame_peaks(self, frames: int) -> np.ndarray:
        """The true peak (linear) of each of the first ``frames`` frames."""
        got = np.concatenate(self.frames) if self.frames else np.zeros(0, dtype=np.float32)
        return np.pad(got[:frames], (0, max(0, frames - got.shape[0])))
