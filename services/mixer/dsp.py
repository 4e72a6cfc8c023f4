"""The mix itself: music ducked under speech, faded, then loudness-normalised and limited.

All at 48 kHz, float32, shape (n, channels). Loudness follows ITU-R BS.1770 (pyloudnorm);
true peak is measured on a 4x oversampled signal, as BS.1770 prescribes.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d
from scipy.signal import lfilter, resample_poly, sosfilt

SAMPLE_RATE = 48_000
FRAME = 480  # 10 ms
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


def db_to_gain(db: float | np.ndarray) -> float | np.ndarray:
    return 10.0 ** (np.asarray(db) / 20.0)


def frame_rms_db(mono: np.ndarray) -> np.ndarray:
    frames = mono.shape[0] // FRAME
    if frames == 0:
        return np.full(1, -120.0)
    power = (mono[: frames * FRAME].reshape(frames, FRAME) ** 2).mean(axis=1)
    return 10 * np.log10(power + 1e-12)


def speech_activity(speech: np.ndarray) -> np.ndarray:
    """Per-sample 0/1: where someone is talking, from the speech stem's 10 ms levels.

    The threshold follows the speech's own level (30 dB under its loud frames), so quiet
    and loud recordings are treated alike; pauses under 300 ms do not count as gaps.
    """
    levels = frame_rms_db(speech.mean(axis=1) if speech.ndim == 2 else speech)
    loud = np.percentile(levels, 95)
    active = levels > max(loud - 30.0, -60.0)
    bridge = 30  # frames (300 ms)
    active = maximum_filter1d(active.astype(np.uint8), size=bridge, mode="constant").astype(bool)
    per_sample = np.repeat(active, FRAME)
    n = speech.shape[0]
    out = np.zeros(n, dtype=bool)
    out[: min(n, per_sample.shape[0])] = per_sample[:n]
    return out


def smooth_gain(target_db: np.ndarray, attack_ms: float, release_ms: float) -> np.ndarray:
    """One-pole smoothing of a gain curve in dB: fast going down (attack), slow coming back."""
    out = np.empty_like(target_db)
    a_att = np.exp(-1.0 / max(1.0, attack_ms * SAMPLE_RATE / 1000 / FRAME))
    a_rel = np.exp(-1.0 / max(1.0, release_ms * SAMPLE_RATE / 1000 / FRAME))
    # Smooth at frame rate (cheap), then interpolate to samples.
    frames = target_db[::FRAME]
    smoothed = np.empty_like(frames)
    level = frames[0] if frames.size else 0.0
    for i, target in enumerate(frames):
        coeff = a_att if target < level else a_rel
        level = coeff * level + (1 - coeff) * target
        smoothed[i] = level
    positions = np.arange(target_db.shape[0]) / FRAME
    out[:] = np.interp(positions, np.arange(frames.shape[0]), smoothed)
    return out


def duck_curve(active: np.ndarray, levels: MixLevels) -> np.ndarray:
    """Gain (linear) for the music: -duck_db while speech is active, 0 dB between."""
    lead = int(levels.attack_ms * SAMPLE_RATE / 1000)
    # Start dipping a little before speech begins so the first syllable is never masked.
    early = np.concatenate([active[lead:], np.zeros(min(lead, active.shape[0]), dtype=bool)]) | active
    target_db = np.where(early, -levels.duck_db, 0.0).astype(np.float32)
    return np.asarray(db_to_gain(smooth_gain(target_db, levels.attack_ms, levels.release_ms)), dtype=np.float32)


def fades(n: int, fade_in_s: float, fade_out_s: float) -> np.ndarray:
    curve = np.ones(n, dtype=np.float32)
    fin = min(n, int(fade_in_s * SAMPLE_RATE))
    fout = min(n - fin, int(fade_out_s * SAMPLE_RATE))
    if fin:
        curve[:fin] = np.linspace(0.0, 1.0, fin, dtype=np.float32) ** 2
    if fout:
        curve[n - fout :] = np.linspace(1.0, 0.0, fout, dtype=np.float32) ** 2
    return curve


def _k_weighting() -> np.ndarray:
    """BS.1770's K-weighting at 48 kHz as second-order sections (pyloudnorm's coefficients)."""
    import pyloudnorm

    stages = pyloudnorm.Meter(SAMPLE_RATE)._filters.values()
    sos = np.array([np.concatenate([f.b * f.passband_gain, f.a]) for f in stages])
    return sos


K_WEIGHTING = _k_weighting()
STEP = SAMPLE_RATE // 10  # gating blocks are 400 ms long and start every 100 ms
ABSOLUTE_GATE = -70.0
MEASURE_PIECE = 4 * SAMPLE_RATE


class LoudnessMeter:
    """Integrated loudness (ITU-R BS.1770-4, as pyloudnorm measures it), fed in pieces.

    Keeps only the filter state and one energy sum per 100 ms, so a long track can be
    measured while it streams in, and measuring costs one pass of a 2-section IIR filter.
    """

    def __init__(self, channels: int) -> None:
        self.state = np.zeros((K_WEIGHTING.shape[0], channels, 2))
        self.sums: list[np.ndarray] = []  # per 100 ms step: energy summed over channels
        self.partial = np.zeros(0)
        self.samples = 0

    def feed(self, x: np.ndarray) -> None:
        if x.ndim == 1:
            x = x[:, None]
        # Channels first: filtering along contiguous memory is three times faster.
        filtered, self.state = sosfilt(K_WEIGHTING, np.ascontiguousarray(x.T, dtype=np.float64), axis=-1,
                                       zi=self.state)
        energy = np.concatenate([self.partial, np.square(filtered).sum(axis=0)])
        whole = energy.shape[0] // STEP * STEP
        if whole:
            self.sums.append(energy[:whole].reshape(-1, STEP).sum(axis=1))
        self.partial = energy[whole:]
        self.samples += x.shape[0]

    def integrated(self) -> float:
        steps = np.concatenate([*self.sums, [self.partial.sum()]])
        blocks = int(np.round((self.samples / SAMPLE_RATE - 0.4) / 0.1)) + 1
        if blocks < 1:
            return -120.0
        steps = np.pad(steps, (0, max(0, blocks + 3 - steps.shape[0])))
        z = (steps[:blocks] + steps[1 : blocks + 1] + steps[2 : blocks + 2] + steps[3 : blocks + 3]) / (4 * STEP)
        with np.errstate(divide="ignore"):
            block_lufs = -0.691 + 10 * np.log10(z)
        gated = z[block_lufs >= ABSOLUTE_GATE]
        if gated.size == 0:
            return -120.0
        relative = -0.691 + 10 * np.log10(gated.mean()) - 10.0
        final = z[(block_lufs > relative) & (block_lufs > ABSOLUTE_GATE)]
        value = -0.691 + 10 * np.log10(final.mean()) if final.size else -np.inf
        return float(value) if np.isfinite(value) else -120.0


def loudness(x: np.ndarray) -> float:
    if x.shape[0] < SAMPLE_RATE // 2:  # BS.1770 gating needs at least one 400 ms block
        x = np.pad(x, ((0, SAMPLE_RATE // 2 - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
    meter = LoudnessMeter(x.shape[1] if x.ndim == 2 else 1)
    # A few seconds at a time: small temporaries stay in cache and reuse the same memory.
    for start in range(0, x.shape[0], MEASURE_PIECE):
        meter.feed(x[start : start + MEASURE_PIECE])
    return meter.integrated()


# Inter-sample peaks rise at most a few dB over the sample peaks around them, so only
# blocks whose sample peak is within this margin of what matters are oversampled.
OVERSAMPLE_MARGIN_DB = 3.0
BLOCK = 4800
CONTEXT = 64  # samples of filter context at block edges
RUN = 100  # blocks oversampled in one call (10 s)


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
    hot = np.flatnonzero(padded.reshape(blocks, BLOCK).max(axis=1) > near)
    if hot.size == 0:
        return env
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
    sample_peak = float(np.abs(x).max())
    near = sample_peak * float(db_to_gain(-OVERSAMPLE_MARGIN_DB))
    return 20 * np.log10(float(peak_envelope(x, near).max()) + 1e-12)


# The gain is computed per step of 8 samples (1/6 ms) and interpolated between steps: 48-sample
# steps widened the gain dips enough to cost a word in the remix WER test.
LIMITER_STEP = 8


def limit(x: np.ndarray, ceiling_db: float, release_ms: float = 60.0) -> np.ndarray:
    """Look-ahead peak limiter on the true-peak envelope, keeping peaks under the ceiling.

    The gain is worked out per step (the envelope's maximum over each step) and
    interpolated between values that are never above either neighbouring step's, so each
    sample gets at most the gain its own step allows.
    """
    ceiling = float(db_to_gain(ceiling_db - 0.1))
    env = peak_envelope(x, ceiling * float(db_to_gain(-OVERSAMPLE_MARGIN_DB)))
    if env.max() <= ceiling:
        return x.astype(np.float32, copy=False)
    n = env.shape[0]
    steps = -(-n // LIMITER_STEP)
    peaks = np.pad(env, (0, steps * LIMITER_STEP - n)).reshape(steps, LIMITER_STEP).max(axis=1)
    lookahead = 5 * 48 // LIMITER_STEP  # steps (5 ms)
    peaks = maximum_filter1d(peaks, size=2 * lookahead + 1)
    gain = np.minimum(1.0, ceiling / np.maximum(peaks, 1e-9))
    # Release: let the gain recover slowly (min-hold keeps the reduction where it is needed).
    coeff = np.exp(-1.0 / (release_ms / 1000 * SAMPLE_RATE / LIMITER_STEP))
    recovered = lfilter([1 - coeff], [1, -coeff], gain, zi=[gain[0] * coeff])[0]
    gain = np.minimum(gain, recovered)
    gain = -maximum_filter1d(-gain, size=2 * lookahead + 1)  # spread reductions both ways
    knots = np.minimum(gain, np.concatenate([gain[:1], gain[:-1]]))  # value at each step's start
    knots = np.append(knots, gain[-1])
    positions = np.arange(n) / LIMITER_STEP
    per_sample = np.interp(positions, np.arange(steps + 1), knots).astype(np.float32)
    return (x * per_sample[:, None]).astype(np.float32)


@dataclass(frozen=True)
class MixOutcome:
    mix: np.ndarray
    bgm: np.ndarray
    loudness_lufs: float
    true_peak_dbtp: float


def mix(speech: np.ndarray, bgm: np.ndarray, levels: MixLevels) -> MixOutcome:
    """speech (n, 2), bgm (n, 2), same length, 48 kHz -> the final stereo mix."""
    active = speech_activity(speech)
    return mix_measured(speech, bgm, levels, active, loudness(speech) if active.any() else None, loudness(bgm))


def mix_measured(speech: np.ndarray, bgm: np.ndarray, levels: MixLevels, active: np.ndarray,
                 speech_lufs: float | None, bgm_lufs: float, measure_peak: bool = True) -> MixOutcome:
    """``mix`` with the inputs' measurements already taken (the mixer takes them as tracks arrive).

    ``measure_peak=False`` leaves the true peak as NaN, for a caller that measures the encoded file.
    """
    n = speech.shape[0]
    speech_level = -23.0 if speech_lufs is None else speech_lufs
    bed_gain = db_to_gain(speech_level + levels.bgm_gain_db - bgm_lufs) if bgm_lufs > -70 else 1.0
    curve = duck_curve(active, levels) * fades(n, levels.fade_in_s, levels.fade_out_s)
    placed = (bgm * bed_gain * curve[:, None]).astype(np.float32)
    out = speech + placed
    # Gain moves integrated loudness one for one, so measure once and scale; limiting then
    # lowers it a little, which one more measurement and a small top-up correct.
    total_gain = 1.0
    current = loudness(out)
    for _ in range(3):
        if current <= -70:
            break
        step = float(db_to_gain(levels.loudness_lufs - current))
        total_gain *= step
        out = limit((out * step).astype(np.float32), levels.true_peak_dbtp - CODEC_HEADROOM_DB)
        current = loudness(out)
        if abs(current - levels.loudness_lufs) < 0.3:
            break
    peak = true_peak_db(out) if measure_peak else float("nan")
    return MixOutcome(out, (placed * total_gain).astype(np.float32), current, peak)
