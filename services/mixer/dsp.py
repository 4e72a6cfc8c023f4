"""The mix itself: music ducked under speech, faded, then loudness-normalised and limited.

All at 48 kHz, float32, shape (n, channels). Loudness follows ITU-R BS.1770 (``bgm.loudness``);
true peak is measured on a 4x oversampled signal, as BS.1770 prescribes.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import maximum_filter1d
from scipy.signal import butter, lfilter, resample_poly, sosfiltfilt

from bgm import vocab
from bgm.loudness import LoudnessMeter as LoudnessMeter  # re-exported: the mixer measures through dsp
from bgm.loudness import energy_steps, loudness, loudness_of_steps
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
    down = activity.ducking(talking, levels.hold_ms)
    lead = round(levels.attack_ms / 1000 * SAMPLE_RATE / FRAME)
    # Start dipping a little before speech begins so the first syllable is never masked.
    early = np.concatenate([down[lead:], np.zeros(min(lead, down.shape[0]), dtype=bool)]) | down
    depth = levels.duck_db if depth_db is None else depth_db
    target_db = np.where(early, -depth, 0.0).astype(np.float32)
    smoothed = smooth_gain(target_db, levels.attack_ms, levels.release_ms)
    return activity.to_samples(np.asarray(db_to_gain(smoothed), dtype=np.float32), n)


# Where speech is understood (most of the Speech Intelligibility Index's weight): under speech
# the music dips duck_db here and only duck_wide_db around it, so its bass and air carry on.
SPEECH_BAND_HZ = (200.0, 9000.0)
BAND_BLOCK_S = 10.0  # the music is placed in blocks this long
BAND_MARGIN_S = 0.25  # filter context at block edges; the band filter rings for a few ms


@functools.cache
def _speech_band_sos() -> np.ndarray:
    return np.asarray(butter(2, SPEECH_BAND_HZ, btype="bandpass", fs=SAMPLE_RATE, output="sos"))


def _band_of(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The speech band of ``x[lo:hi]`` (zero-phase, filtered with context either side), so
    ``x - band`` is the rest exactly."""
    n, margin = x.shape[0], round(BAND_MARGIN_S * SAMPLE_RATE)
    ctx_lo, ctx_hi = max(0, lo - margin), min(n, hi + margin)
    if ctx_hi - ctx_lo <= 15:  # too short for filtfilt's padding: no band to speak of
        return np.zeros_like(x[lo:hi])
    band = sosfiltfilt(_speech_band_sos(), x[ctx_lo:ctx_hi], axis=0)
    return np.asarray(band[lo - ctx_lo : hi - ctx_lo], dtype=np.float32)


def place_music(bgm: np.ndarray, talking: np.ndarray, levels: MixLevels, scale: float) -> np.ndarray:
    """The music ducked under speech (its speech band by duck_db, the rest by duck_wide_db),
    faded in and out, times ``scale``. One pass in blocks shared by the cores, with no
    whole-programme stereo temporaries (only the two gain curves): 1.5 s on 10 minutes,
    against 3.4 s in whole-array steps."""
    n = bgm.shape[0]
    wide_db = min(levels.duck_wide_db, levels.duck_db)
    curve = duck_curve(talking, levels, n, wide_db)
    apply_fades(curve, levels.fade_in_s, levels.fade_out_s)
    curve *= np.float32(scale)
    # Where cut > 0 the band dips that much more: music - cut * band, all times the curve.
    cut = None if wide_db >= levels.duck_db else 1.0 - duck_curve(talking, levels, n, levels.duck_db - wide_db)
    placed = np.empty((n, bgm.shape[1]), dtype=np.float32)
    block = round(BAND_BLOCK_S * SAMPLE_RATE)

    def work(lo: int) -> None:
        hi = min(n, lo + block)
        out = placed[lo:hi]
        if cut is not None and float(cut[lo:hi].max()) > 1e-3:
            band = _band_of(bgm, lo, hi)
            band *= cut[lo:hi, None]
            np.subtract(bgm[lo:hi], band, out=out)
            out *= curve[lo:hi, None]
        else:
            np.multiply(bgm[lo:hi], curve[lo:hi, None], out=out)

    list(_workers().map(work, range(0, n, block)))
    return placed


def apply_fades(curve: np.ndarray, fade_in_s: float, fade_out_s: float) -> None:
    """Fade a per-sample gain curve in and out, in place (squared ramps)."""
    n = curve.shape[0]
    fin = min(n, int(fade_in_s * SAMPLE_RATE))
    fout = min(n - fin, int(fade_out_s * SAMPLE_RATE))
    if fin:
        curve[:fin] *= np.linspace(0.0, 1.0, fin, dtype=np.float32) ** 2
    if fout:
        curve[n - fout :] *= np.linspace(1.0, 0.0, fout, dtype=np.float32) ** 2


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
    peaks = np.pad(env, (0, steps * LIMITER_STEP - n)).reshape(steps, LIMITER_STEP).max(axis=1)
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


@dataclass(frozen=True)
class MixOutcome:
    """The mix, and what it is made of: ``mix == (voice + placed) * gain`` per sample. The
    stems are worked out only when asked for (on a long programme each costs a pass)."""

    mix: np.ndarray
    # The parts (None where the mix was made without keeping them: no stems wanted).
    placed: np.ndarray | None  # the music as placed (ducked, faded, at the bed's level), before ``gain``
    voice: np.ndarray | None  # the speech as gated, before ``gain``
    gain: np.ndarray  # per sample: loudness, limiter and codec dips together
    loudness_lufs: float
    true_peak_dbtp: float
    encodes: int = 0  # how many encodes the true-peak ceiling took (the mixer fills it in)

    @property
    def bgm(self) -> np.ndarray:
        """The music as it sits in the mix (ducked, faded, gained, limited)."""
        return np.multiply(self._part(self.placed), self.gain[:, None], dtype=np.float32)

    @property
    def speech(self) -> np.ndarray:
        """The speech as it sits in the mix (gated, gained, limited)."""
        return np.multiply(self._part(self.voice), self.gain[:, None], dtype=np.float32)

    @staticmethod
    def _part(part: np.ndarray | None) -> np.ndarray:
        if part is None:
            raise ValueError("this mix was made without keeping its parts (keep_parts=False)")
        return part

    def scaled(self, gain: float | np.ndarray, in_place: bool = False) -> MixOutcome:
        """The same mix with ``gain`` applied (a number, or one per sample); the stems likewise.
        ``in_place``: this outcome's mix is overwritten (no second whole-length copy)."""
        g = np.asarray(gain, dtype=np.float32)
        frames = g[:, None] if g.ndim else g
        mix = np.multiply(self.mix, frames, out=self.mix) if in_place else np.multiply(self.mix, frames,
                                                                                          dtype=np.float32)
        return replace(self, mix=mix, gain=np.multiply(self.gain, g, dtype=np.float32))


DIP_WIDTH_S = 0.05  # wide enough to cover the codec's delay and its transform blocks
DIP_MARGIN_DB = 0.3


def codec_dips(encoded: np.ndarray, ceiling_db: float, n: int) -> np.ndarray:
    """Per-sample gain (n samples) that dips smoothly wherever ``encoded`` (the decoded file)
    went over ``ceiling_db``: by the overshoot plus a margin, DIP_WIDTH_S either side; 1 elsewhere.

    A codec's overshoot is local (a transient), so a local dip holds the ceiling without
    touching the programme's loudness.
    """
    ceiling = float(db_to_gain(ceiling_db))
    env = peak_envelope(encoded, ceiling * float(db_to_gain(-OVERSAMPLE_MARGIN_DB)))[:n]
    frames = -(-n // FRAME)
    per_frame = np.pad(env, (0, frames * FRAME - env.shape[0])).reshape(frames, FRAME).max(axis=1)
    over_db = 20 * np.log10(np.maximum(per_frame, 1e-9) / ceiling)
    dip_db = np.where(over_db > 0, over_db + DIP_MARGIN_DB, 0.0)
    width = round(DIP_WIDTH_S * SAMPLE_RATE / FRAME)
    dip_db = maximum_filter1d(dip_db, size=2 * width + 1)
    # Each over-frame lies ``width`` inside its plateau, so the smoothing keeps its full depth.
    window = np.hanning(2 * width + 3)[1:-1]
    dip_db = np.convolve(dip_db, window / window.sum(), mode="same")
    return activity.to_samples(np.asarray(db_to_gain(-dip_db), dtype=np.float32), n)


# The envelope is measured near enough to the ceiling for make-up gains up to this much above
# the gain it was first needed for (limiting costs loudness, which the make-up gives back); a
# programme that needs more is measured again, up to MAX_MAKEUP_DB of make-up.
MAKEUP_RANGE_DB = 3.0
MAX_MAKEUP_DB = 24.0


class Leveller:
    """Finds the per-sample gain that brings a programme to a loudness with its true peak under
    the ceiling, without measuring the programme again for each candidate gain.

    One filtering pass and one envelope serve every candidate: the envelope of a scaled
    programme is the scaled envelope, and with a gain that is constant over each limiter step
    the K-weighted energy per step simply scales by its square. On 10 minutes the levelling
    took two envelopes and four loudness passes before (9 s). The estimate is close where
    the limiter works little (0.01-0.05 LU) and reads low where it works hard (0.3 LU at 8 dB
    of limiting: a fast-changing gain moves energy up to where K-weighting lifts it), so
    ``mix_measured`` measures the result once and aims again if it missed.
    """

    def __init__(self, out: np.ndarray, levels: MixLevels) -> None:
        self.out, self.n = out, out.shape[0]
        self.energy = energy_steps(out, LIMITER_STEP)
        self.loudness = loudness_of_steps(self.energy, LIMITER_STEP, self.n)
        self.ceiling = float(db_to_gain(levels.true_peak_dbtp - CODEC_HEADROOM_DB - 0.1))
        self.peaks: np.ndarray | None = None
        self.covered = 0.0  # the highest gain the envelope was measured for

    def _peaks_for(self, scale: float) -> np.ndarray:
        if self.peaks is None or scale > self.covered:
            self.covered = scale * float(db_to_gain(MAKEUP_RANGE_DB))
            near = self.ceiling / self.covered * float(db_to_gain(-OVERSAMPLE_MARGIN_DB))
            self.peaks = step_peaks(peak_envelope(self.out, near))
        return self.peaks

    def estimate(self, scale: float) -> tuple[np.ndarray | None, float]:
        """Limiter steps at this gain, and the loudness they give."""
        steps = limiter_release(self._peaks_for(scale) * scale, self.ceiling)
        if steps is None:
            return None, self.loudness + 20 * np.log10(scale)
        return steps, loudness_of_steps(self.energy * (scale * scale) * np.square(steps), LIMITER_STEP, self.n)

    def gain(self, aim: float) -> tuple[np.ndarray, float]:
        """The per-sample gain aimed at ``aim`` LUFS, and its estimated loudness."""
        x = aim - self.loudness  # the gain in dB: a secant search on its estimated loudness
        limit = x + MAX_MAKEUP_DB
        steps, current = self.estimate(float(db_to_gain(x)))
        previous: tuple[float, float] | None = None
        for _ in range(12):
            if abs(current - aim) < 0.01 or x >= limit:
                break
            slope = 1.0 if previous is None else (current - previous[1]) / (x - previous[0])
            previous = (x, current)
            x = min(limit, x + (aim - current) / min(1.0, max(0.05, slope)))
            steps, current = self.estimate(float(db_to_gain(x)))
        scale = np.float32(db_to_gain(x))
        if steps is None:
            return np.full(self.n, scale, dtype=np.float32), current
        curve = limiter_curve(steps, self.n)
        curve *= scale
        return curve, current


def mix(speech: np.ndarray, bgm: np.ndarray, levels: MixLevels) -> MixOutcome:
    """speech (n, 2), bgm (n, 2), same length, 48 kHz -> the final stereo mix."""
    threshold = activity.threshold_for(levels.duck_sensitivity)
    talking = activity.detect(activity.speech_probability(speech.mean(axis=1)), threshold, speech.shape[0])
    return mix_measured(speech, bgm, levels, talking, loudness(bgm))


def mix_measured(speech: np.ndarray, bgm: np.ndarray, levels: MixLevels, talking: np.ndarray,
                 bgm_lufs: float, measure_peak: bool = True, *, consume: bool = False,
                 keep_parts: bool = True) -> MixOutcome:
    """``mix`` with the speech activity (per 10 ms frame) and the music's loudness already known
    (the mixer takes them as tracks arrive).

    The speech is gated to where someone talks, so what separation left of the old music is
    gone from the pauses. ``measure_peak=False`` leaves the true peak as NaN, for a caller
    that measures the encoded file.

    On a long programme each whole-length stereo array is hundreds of MB, so a caller that
    owns ``speech`` lets it be gated in place (``consume``), and one that wants no stems
    lets the placed music become the mix (``keep_parts=False``: the outcome has no parts).
    """
    n = speech.shape[0]
    gate = activity.gate(talking, n)[:, None]
    speech = np.multiply(speech, gate, out=speech) if consume else np.multiply(speech, gate, dtype=np.float32)
    speech_lufs = loudness(speech) if talking.any() else None
    speech_level = -23.0 if speech_lufs is None or speech_lufs <= -70 else speech_lufs
    bed_gain = np.float32(db_to_gain(speech_level + levels.bgm_gain_db - bgm_lufs) if bgm_lufs > -70 else 1.0)
    music = place_music(bgm, talking, levels, float(bed_gain))
    out = speech + music if keep_parts else np.add(music, speech, out=music)
    placed, voice = (music, speech) if keep_parts else (None, None)
    del music, speech  # without parts, only the mix is held from here
    leveller = Leveller(out, levels)
    if leveller.loudness <= -70:
        gain, current = np.ones(n, dtype=np.float32), leveller.loudness
    else:
        gain, estimate = leveller.gain(levels.loudness_lufs)
        out *= gain[:, None]  # in place: on a long programme a copy is hundreds of MB
        current = loudness(out)
        if abs(current - levels.loudness_lufs) > 0.1:  # missed (hard limiting): aim again, corrected
            out /= gain[:, None]  # back to the programme the leveller measures (it keeps a reference)
            gain, _ = leveller.gain(levels.loudness_lufs - (current - estimate))
            out *= gain[:, None]
            current = loudness(out)
    peak = true_peak_db(out) if measure_peak else float("nan")
    return MixOutcome(out, placed, voice, gain, current, peak)
