"""The mix itself: music ducked under speech, faded, then loudness-normalised and limited.

All at 48 kHz, float32, shape (n, channels). Loudness follows ITU-R BS.1770 (pyloudnorm);
true peak is measured on a 4x oversampled signal, as BS.1770 prescribes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d
from scipy.signal import lfilter, resample_poly

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


def loudness(x: np.ndarray) -> float:
    import pyloudnorm

    if x.shape[0] < SAMPLE_RATE // 2:  # BS.1770 gating needs at least one 400 ms block
        x = np.pad(x, ((0, SAMPLE_RATE // 2 - x.shape[0]), (0, 0)))
    value = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(x.astype(np.float64))
    return float(value) if np.isfinite(value) else -120.0


# Inter-sample peaks rise at most a few dB over the sample peaks around them, so only
# blocks whose sample peak is within this margin of what matters are oversampled.
OVERSAMPLE_MARGIN_DB = 3.0
BLOCK = 4800


def peak_envelope(x: np.ndarray, near: float) -> np.ndarray:
    """Per-sample peak (max over channels), true peak (4x oversampled, BS.1770) in blocks whose
    sample peak exceeds ``near`` (linear), plain sample peak elsewhere."""
    env = np.abs(x).max(axis=1) if x.ndim == 2 else np.abs(x)
    n = env.shape[0]
    blocks = -(-n // BLOCK)
    padded = np.pad(env, (0, blocks * BLOCK - n))
    hot = np.flatnonzero(padded.reshape(blocks, BLOCK).max(axis=1) > near)
    out = env.copy()
    for b in hot.tolist():
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        ctx_lo, ctx_hi = max(0, lo - 64), min(n, hi + 64)  # filter context at block edges
        over = np.abs(resample_poly(x[ctx_lo:ctx_hi], 4, 1, axis=0))
        over = over.max(axis=1) if over.ndim == 2 else over
        per_sample = over[: (ctx_hi - ctx_lo) * 4].reshape(-1, 4).max(axis=1)
        out[lo:hi] = np.maximum(env[lo:hi], per_sample[lo - ctx_lo : hi - ctx_lo])
    return out


def true_peak_db(x: np.ndarray) -> float:
    if x.size == 0:
        return -240.0
    sample_peak = float(np.abs(x).max())
    near = sample_peak * float(db_to_gain(-OVERSAMPLE_MARGIN_DB))
    return 20 * np.log10(float(peak_envelope(x, near).max()) + 1e-12)


def limit(x: np.ndarray, ceiling_db: float, release_ms: float = 60.0) -> np.ndarray:
    """Look-ahead peak limiter on the true-peak envelope, keeping peaks under the ceiling."""
    ceiling = float(db_to_gain(ceiling_db - 0.1))
    env = peak_envelope(x, ceiling * float(db_to_gain(-OVERSAMPLE_MARGIN_DB)))
    if env.max() <= ceiling:
        return x.astype(np.float32, copy=False)
    lookahead = int(0.005 * SAMPLE_RATE)
    env = maximum_filter1d(env, size=2 * lookahead + 1)
    gain = np.minimum(1.0, ceiling / np.maximum(env, 1e-9))
    # Release: let the gain recover slowly (min-hold keeps the reduction where it is needed).
    coeff = np.exp(-1.0 / (release_ms * SAMPLE_RATE / 1000))
    recovered = lfilter([1 - coeff], [1, -coeff], gain, zi=[gain[0] * coeff])[0]
    gain = np.minimum(gain, recovered)
    gain = -maximum_filter1d(-gain, size=2 * lookahead + 1)  # spread reductions both ways
    return (x * gain[:, None]).astype(np.float32)


@dataclass(frozen=True)
class MixOutcome:
    mix: np.ndarray
    bgm: np.ndarray
    loudness_lufs: float
    true_peak_dbtp: float


def mix(speech: np.ndarray, bgm: np.ndarray, levels: MixLevels) -> MixOutcome:
    """speech (n, 2), bgm (n, 2), same length, 48 kHz -> the final stereo mix."""
    n = speech.shape[0]
    active = speech_activity(speech)
    speech_level = loudness(speech) if active.any() else -23.0
    bgm_level = loudness(bgm)
    bed_gain = db_to_gain(speech_level + levels.bgm_gain_db - bgm_level) if bgm_level > -70 else 1.0
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
    return MixOutcome(out, (placed * total_gain).astype(np.float32), current, true_peak_db(out))
