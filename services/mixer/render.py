"""The mix of a whole programme, made a block at a time: music ducked under speech, faded,
then brought to a loudness with its true peak under the ceiling.

Nothing here holds a whole-programme signal. The speech and the music are read from their
tracks in blocks (``sources``); what is known of the whole programme is kept per 10 ms
frame (speech activity, the gate, the duck, codec dips) or per limiter step of 8 samples
(K-weighted energy and peaks for the levelling). The mix is rendered again for each pass
that needs it (measure, envelope, check, encode) rather than kept: rendering is cheap
next to holding an hour of stereo (1.4 GB per copy). Only a short programme (HOLD_S) is
rendered once and held.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from scipy.ndimage import maximum_filter1d
from scipy.signal import lfilter

from bgm.loudness import LoudnessMeter, StepEnergy, gated_loudness, loudness_of_blocks
from services.mixer import aac, activity, dsp
from services.mixer.dsp import LIMITER_STEP, MixLevels, db_to_gain
from services.mixer.sources import ArraySource, Silence, Source
from services.mixer.steps import StepFile

RATE = dsp.SAMPLE_RATE
BLOCK = 10 * RATE  # a whole number of frames, limiter steps and loudness steps
BAND_MARGIN = round(dsp.BAND_MARGIN_S * RATE)
UNIT = aac.UNIT  # what a re-render compares (``UnitDigests``): whole AAC frames and 10 ms frames
# A programme this short has its mix (before the levelling gain) rendered once and held for
# the passes that read it (energy, envelope, measure, encode): 46 MB at most, where a 30 s
# clip spent about 0.4 s of its tail rendering the same mix four times.
HOLD_S = 120.0
T = TypeVar("T")


@functools.cache
def _block_workers() -> ThreadPoolExecutor:
    # Its own pool: a block's work uses dsp's pool (oversampling), and waiting on the same
    # pool from inside it would deadlock.
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="bgm-mix")


def in_order(work: Callable[[int, int], T], ranges: Iterable[tuple[int, int]], ahead: int = 2) -> Iterator[T]:
    """``work(lo, hi)`` of each range, shared by the cores, handed back in order with at most
    ``ahead`` blocks made and waiting."""
    pending: deque[Future[T]] = deque()
    for lo, hi in ranges:
        pending.append(_block_workers().submit(work, lo, hi))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class UnitDigests:
    """A digest per UNIT of a signal fed in blocks of any length, in order: where two mixes
    of one programme are the same samples (``reprise``), unit by unit."""

    def __init__(self) -> None:
        self.digests: list[int] = []
        self.carry: np.ndarray | None = None  # the samples of a unit not yet complete

    def feed(self, block: np.ndarray) -> None:
        joined = block if self.carry is None or not self.carry.shape[0] else np.concatenate([self.carry, block])
        whole = joined.shape[0] // UNIT * UNIT
        for lo in range(0, whole, UNIT):
            self.digests.append(_digest(joined[lo : lo + UNIT]))
        self.carry = joined[whole:].copy()

    def finish(self) -> np.ndarray:
        if self.carry is not None and self.carry.shape[0]:
            self.digests.append(_digest(self.carry))
        self.carry = None
        return np.asarray(self.digests, dtype=np.uint64)


def _digest(samples: np.ndarray) -> int:
    data = np.ascontiguousarray(samples, dtype=np.float32)
    # sha1 for speed (twice blake2b's here): a fingerprint of content, not a defence.
    return int.from_bytes(hashlib.sha1(data.data, usedforsecurity=False).digest()[:8], "little")


def _blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    return [(a, min(hi, a + BLOCK)) for a in range(lo, hi, BLOCK)]


def _steps_of(source: StepFile, a: int, b: int) -> Iterator[np.ndarray]:
    """Steps [a, b) of ``source``, a chunk at a time."""
    for first in range(a, b, CHUNK_STEPS):
        yield source.read(first, min(b, first + CHUNK_STEPS))


@dataclass(frozen=True)
class Plan:
    """How each block of the mix is made, before the levelling gain: the speech gated to
    where someone talks, and the music ducked under it (its speech band ``duck_db``, the
    rest ``duck_wide_db``), faded in and out, at the bed's level."""

    speech: Source
    music: Source
    length: int
    levels: MixLevels
    gate: np.ndarray  # per frame: the speech's gain
    duck: np.ndarray  # per frame: the whole music's gain (duck_wide_db under speech)
    band_duck: np.ndarray | None  # per frame: the speech band's further gain (None: no further dip)
    bed_gain: float
    held: np.ndarray | None = None  # the whole of ``mixed``, for a short programme (see HOLD_S)

    def ranges(self) -> list[tuple[int, int]]:
        return [(lo, min(self.length, lo + BLOCK)) for lo in range(0, self.length, BLOCK)]

    def voice(self, lo: int, hi: int) -> np.ndarray:
        return gated(self.speech, self.gate, lo, hi)

    def placed(self, lo: int, hi: int) -> np.ndarray:
        curve = activity.frames_to_block(self.duck, lo, hi)
        fade = dsp.fades(self.length, self.levels.fade_in_s, self.levels.fade_out_s, lo, hi)
        if fade is not None:
            curve *= fade
        curve *= np.float32(self.bed_gain)
        cut = None if self.band_duck is None else 1.0 - activity.frames_to_block(self.band_duck, lo, hi)
        if cut is not None and float(cut.max()) > 1e-3:
            # Where cut > 0 the band dips that much more: music - cut * band, all times the curve.
            ctx_lo, ctx_hi = max(0, lo - BAND_MARGIN), min(self.length, hi + BAND_MARGIN)
            wide = self.music.read(ctx_lo, ctx_hi)
            band = dsp.band_of(wide, lo - ctx_lo, hi - ctx_lo)
            band *= cut[:, None]
            music = wide[lo - ctx_lo : hi - ctx_lo] - band
        else:
            music = self.music.read(lo, hi)
        music *= curve[:, None]
        return music

    def mixed(self, lo: int, hi: int) -> np.ndarray:
        """The mix before the levelling gain."""
        if self.held is not None:
            return self.held[lo:hi].copy()
        out = self.placed(lo, hi)
        out += self.voice(lo, hi)
        return out


@dataclass(frozen=True)
class KeptLevels:
    """The levels an earlier mix of the same programme settled on (``reprise``): kept by a
    new mix where they still hold, so what did not change comes out sample for sample the
    same."""

    bed_gain: float
    scale: float  # the levelling gain's number (``Gain.scale``)
    estimate_lufs: float  # the leveller's estimate at that scale
    measured_lufs: float  # what the encoded mix measured


# A kept level holds while the bed would now go within this much of it (an edited span moves
# the whole score's loudness a little: each span is levelled on its own), and while the
# programme at the kept gain still lands within this much of its loudness target: EBU R128's
# tolerance for a programme, so that a re-render keeps what the creator already heard
# rather than moving every sample by a fraction of a dB (a mix aimed afresh lands within
# AIM_LU).
KEPT_BED_DB = 1.0
KEPT_LOUDNESS_LU = 0.5
AIM_LU = 0.1


@dataclass(frozen=True)
class Reuse:
    """What an earlier mix of the programme measured, for the units whose mix a new one
    leaves as it was (``reprise``): those are neither rendered nor measured again."""

    dirty: np.ndarray  # per UNIT: where the mix may have changed (the music there, or near enough to filter)
    digests: np.ndarray  # per UNIT: the earlier mix before the levelling gain
    energy: StepFile  # per limiter step: its K-weighted energy
    peaks: StepFile  # per limiter step: its envelope, measured for gains up to ``covered``
    covered: float


def unit_runs(marked: np.ndarray) -> Iterator[tuple[bool, int, int]]:
    """(marked, first unit, end unit) of each run of equal values, in order."""
    edges = [0, *(np.flatnonzero(np.diff(marked.astype(np.int8))) + 1).tolist(), marked.shape[0]]
    for a, b in itertools.pairwise(edges):
        if b > a:
            yield bool(marked[a]), a, b


@dataclass(frozen=True)
class VoiceLoudness:
    """The gated speech's loudness (None: nobody talks) for one speech activity: measured
    while the mixer still waits for the music, used if the activity is still the same."""

    talking: np.ndarray
    lufs: float | None

    def fits(self, talking: np.ndarray) -> bool:
        """Whether it was measured for this speech activity."""
        return bool(np.array_equal(self.talking, talking))


def gated(speech: Source, gate: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Speech samples [lo, hi) times the gate (per frame)."""
    out = speech.read(lo, hi)
    out *= activity.frames_to_block(gate, lo, hi)[:, None]
    return out


def voice_loudness(speech: Source, talking: np.ndarray) -> VoiceLoudness:
    if not talking.any():
        return VoiceLoudness(talking, None)
    gate, n = activity.gate_frames(talking), speech.length
    blocks = (gated(speech, gate, lo, min(n, lo + BLOCK)) for lo in range(0, n, BLOCK))
    return VoiceLoudness(talking, loudness_of_blocks(blocks, 2))


def plan(speech: Source, music: Source, levels: MixLevels, talking: np.ndarray, bgm_lufs: float,
         known: VoiceLoudness | None = None, kept_bed_gain: float | None = None, hold: bool = True) -> Plan:
    """How the mix is made; ``kept_bed_gain``, an earlier mix's bed gain, used where the bed
    would now go within KEPT_BED_DB of it; ``hold``: a short programme rendered once and
    held (not where most of it is reused from an earlier mix)."""
    n = speech.length
    unplaced = Plan(speech, music, n, levels, activity.gate_frames(talking), *_ducks(talking, levels), 1.0)
    if known is None or not known.fits(talking):
        known = voice_loudness(speech, talking)
    speech_lufs = known.lufs
    speech_level = -23.0 if speech_lufs is None or speech_lufs <= -70 else speech_lufs
    bed_gain = float(db_to_gain(speech_level + levels.bgm_gain_db - bgm_lufs)) if bgm_lufs > -70 else 1.0
    if kept_bed_gain is not None and kept_bed_gain > 0 and abs(20 * np.log10(bed_gain / kept_bed_gain)) <= KEPT_BED_DB:
        bed_gain = kept_bed_gain
    made = replace(unplaced, bed_gain=bed_gain)
    if hold and n <= HOLD_S * RATE:
        made = replace(made, held=np.concatenate([np.zeros((0, 2), dtype=np.float32),
                                                  *in_order(made.mixed, made.ranges())]))
    return made


@dataclass(frozen=True)
class Gain:
    """The levelling gain per sample, as a number times the limiter's curve (per step of
    LIMITER_STEP samples) times dips where the encoder overshot (per 10 ms frame)."""

    length: int
    scale: float
    limiter: StepFile | None = None
    dips: np.ndarray | None = None

    def block(self, lo: int, hi: int) -> np.ndarray:
        gain = (dsp.limiter_block(self.limiter.read, self.limiter.length, lo, hi) if self.limiter is not None
                else np.ones(hi - lo, dtype=np.float32))
        if self.dips is not None:
            gain *= activity.frames_to_block(self.dips, lo, hi)
        gain *= np.float32(self.scale)
        return gain

    def unit_digests(self) -> np.ndarray:
        """Per UNIT, a digest of this gain without its dips (``reprise``), a block at a time."""
        plain = replace(self, dips=None)
        digests = UnitDigests()
        for block in in_order(plain.block, _blocks(0, self.length)):
            digests.feed(block)
        return digests.finish()

    def times(self, scale: float = 1.0, dips: np.ndarray | None = None) -> Gain:
        both = dips if self.dips is None or dips is None else self.dips * dips
        return replace(self, scale=self.scale * scale, dips=self.dips if dips is None else both)


# The envelope is measured near enough to the ceiling for make-up gains up to this much above
# the gain it was first needed for (limiting costs loudness, which the make-up gives back); a
# programme that needs more is measured again, up to MAX_MAKEUP_DB of make-up.
MAKEUP_RANGE_DB = 3.0
MAX_MAKEUP_DB = 24.0


CHUNK_STEPS = 2000 * (RATE // 10 // LIMITER_STEP)  # steps the search reads at a time (200 s)
HOLD = dsp.LOOKAHEAD_STEPS


class Leveller:
    """Finds the gain that brings a programme to a loudness with its true peak under the
    ceiling, without rendering the programme again for each candidate gain.

    One filtering pass and one envelope serve every candidate: the envelope of a scaled
    programme is the scaled envelope, and with a gain that is constant over each limiter step
    the K-weighted energy per step simply scales by its square. The estimate is close where
    the limiter works little (0.01-0.05 LU) and reads low where it works hard (0.3 LU at 8 dB
    of limiting: a fast-changing gain moves energy up to where K-weighting lifts it), so
    ``mix_measured`` measures the result once and aims again if it missed. The per-step
    energy and envelope wait on disk (``steps``) and each candidate reads them a chunk at a
    time: the limiter's gain is made chunk by chunk with the state of its release carried on.
    """

    def __init__(self, plan: Plan, levels: MixLevels, folder: str | None = None, digests: bool = False,
                 reuse: Reuse | None = None) -> None:
        self.plan, self.n, self.folder, self.reuse = plan, plan.length, folder, reuse
        self.digests: np.ndarray | None = None  # per UNIT, the mix before the gain (asked for)
        if reuse is not None:
            self.energy, self.digests = self._reused_energy(reuse)
        else:
            meter = StepEnergy(2, LIMITER_STEP)
            self.energy = StepFile(folder, "nearest")
            units = UnitDigests() if digests else None
            for block in in_order(plan.mixed, plan.ranges()):
                self.energy.append(meter.feed(block))
                if units is not None:
                    units.feed(block)
            self.digests = None if units is None else units.finish()
        self.tenths = self._tenths(lambda a, b: self.energy.read(a, b))
        self.loudness = gated_loudness(self.tenths, max(self.n, RATE // 2), RATE)
        self.ceiling = float(db_to_gain(levels.true_peak_dbtp - dsp.CODEC_HEADROOM_DB - 0.1))
        self.peaks: StepFile | None = None  # the envelope's peak per step (before the look-ahead hold)
        self.loudest = 0.0
        self.covered = 0.0  # the highest gain the envelope was measured for

    def _tenths(self, weighted: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """Energy per 100 ms from energy per step, chunk by chunk (``weighted(a, b)``)."""
        per = RATE // 10 // LIMITER_STEP
        out = [np.add.reduceat(part, np.arange(0, part.shape[0], per)) if part.size else part
               for part in (weighted(a, min(self.energy.length, a + CHUNK_STEPS)).astype(np.float64)
                            for a in range(0, self.energy.length, CHUNK_STEPS))]
        return np.concatenate([np.zeros(0), *out])

    def _unit_bounds(self, a: int, b: int) -> tuple[int, int]:
        return a * UNIT, min(self.n, b * UNIT)

    def _reused_energy(self, reuse: Reuse) -> tuple[StepFile, np.ndarray]:
        """The energy per step and the digest per UNIT: the earlier mix's where the units are
        as they were, measured where they are dirty (the weighting filter run in from a
        unit before, so it has settled)."""
        energy, digests = StepFile(self.folder, "nearest"), reuse.digests.copy()
        for dirty, a, b in unit_runs(reuse.dirty):
            lo, hi = self._unit_bounds(a, b)
            if not dirty:
                for part in _steps_of(reuse.energy, lo // LIMITER_STEP, -(-hi // LIMITER_STEP)):
                    energy.append(part)
                continue
            lead = max(0, lo - UNIT)
            meter, units = StepEnergy(2, LIMITER_STEP), UnitDigests()
            for start, block in zip(range(lead, hi, BLOCK), in_order(self.plan.mixed, _blocks(lead, hi)),
                                    strict=True):
                steps = meter.feed(block)
                skip = max(0, lo - start)
                energy.append(steps[skip // LIMITER_STEP :])
                if block.shape[0] > skip:
                    units.feed(block[skip:])
            digests[a:b] = units.finish()
        return energy, digests

    def _envelope(self, near: float, reuse: Reuse | None = None) -> StepFile:
        """The mix's true-peak envelope (oversampled where over ``near``), its peak per step;
        with ``reuse``, the earlier mix's where the units are as they were."""
        def work(lo: int, hi: int) -> np.ndarray:
            ctx_lo, ctx_hi = max(0, lo - dsp.CONTEXT), min(self.n, hi + dsp.CONTEXT)
            env = dsp.peak_envelope(self.plan.mixed(ctx_lo, ctx_hi), near)[lo - ctx_lo : hi - ctx_lo]
            steps = -(-env.shape[0] // LIMITER_STEP)
            return np.pad(env, (0, steps * LIMITER_STEP - env.shape[0])).reshape(steps, LIMITER_STEP).max(axis=1)

        peaks = StepFile(self.folder, "up")  # never low: the limiter is set by it
        runs = [(True, 0, -(-self.n // UNIT))] if reuse is None else unit_runs(reuse.dirty)
        for dirty, a, b in runs:
            lo, hi = self._unit_bounds(a, b)
            parts = (in_order(work, _blocks(lo, hi)) if dirty or reuse is None
                     else _steps_of(reuse.peaks, lo // LIMITER_STEP, -(-hi // LIMITER_STEP)))
            for part in parts:
                peaks.append(part)
                self.loudest = max(self.loudest, float(part.max(initial=0.0)))
        return peaks

    def _near(self) -> float:
        """The level over which the envelope is oversampled, for gains up to ``covered``."""
        return self.ceiling / self.covered * float(db_to_gain(-dsp.OVERSAMPLE_MARGIN_DB))

    def _peaks_for(self, scale: float) -> StepFile:
        reuse = self.reuse
        if self.peaks is None and reuse is not None and scale <= reuse.covered:
            self.covered = reuse.covered
            self.peaks = self._envelope(self._near(), reuse)
        if self.peaks is None or scale > self.covered:
            self.covered = scale * float(db_to_gain(MAKEUP_RANGE_DB))
            if self.peaks is not None:
                self.peaks.close()
            self.peaks = self._envelope(self._near())
        return self.peaks

    def _held(self, peaks: StepFile, a: int, b: int) -> np.ndarray:
        """``dsp.hold_steps`` of the whole envelope, steps [a, b)."""
        lo = max(0, a - HOLD)
        return dsp.hold_steps(peaks.read(lo, b + HOLD))[a - lo : b - lo]

    def _limiter(self, peaks: StepFile, scale: float) -> Iterator[tuple[int, np.ndarray]]:
        """``dsp.limiter_release`` of the envelope at ``scale``, as (first step, gains) in order."""
        coeff = float(np.exp(-1.0 / (dsp.LIMITER_RELEASE_MS / 1000 * RATE / LIMITER_STEP)))
        state: np.ndarray | None = None
        tail = np.zeros(0, dtype=np.float32)  # the last 2 * HOLD released gains, for the spread
        count = peaks.length
        for a in range(0, count, CHUNK_STEPS):
            b = min(count, a + CHUNK_STEPS)
            gain = np.minimum(np.float32(1.0), self.ceiling / np.maximum(self._held(peaks, a, b) * np.float32(scale),
                                                                          np.float32(1e-9)))
            if state is None:
                state = np.array([gain[0] * coeff])
            recovered, state = lfilter([1 - coeff], [1, -coeff], gain, zi=state)
            released = np.minimum(gain, recovered).astype(np.float32)
            buffer = np.concatenate([tail, released])
            start = a - tail.shape[0]  # the step buffer[0] is
            spread = -maximum_filter1d(-buffer, size=2 * HOLD + 1)  # reductions spread both ways
            out_lo, out_hi = (0 if a == 0 else a - HOLD), (count if b == count else b - HOLD)
            yield out_lo, spread[out_lo - start : out_hi - start]
            tail = buffer[-2 * HOLD :]

    def estimate(self, scale: float, keep: StepFile | None = None) -> tuple[bool, float]:
        """Whether the limiter works at this gain, and the loudness it gives; its gain per
        step goes to ``keep``."""
        peaks = self._peaks_for(scale)
        if self.loudest * scale <= self.ceiling:
            return False, self.loudness + 20 * np.log10(scale)
        tenths = np.zeros_like(self.tenths)
        per = RATE // 10 // LIMITER_STEP
        for first, gains in self._limiter(peaks, scale):
            if gains.size == 0:
                continue
            if keep is not None:
                keep.append(gains)
            last = first + gains.shape[0]
            weighted = self.energy.read(first, last).astype(np.float64) * np.square(gains, dtype=np.float64)
            bins = np.arange(first, last) // per
            tenths[bins[0] : bins[-1] + 1] += np.bincount(bins - bins[0], weights=weighted)
        return True, gated_loudness(tenths * (scale * scale), max(self.n, RATE // 2), RATE)

    def kept_gain(self, aim: float, kept: KeptLevels) -> tuple[Gain, float] | None:
        """An earlier mix's levelling gain and its estimated loudness here, if the programme
        at that gain still lands within KEPT_LOUDNESS_LU of ``aim`` (judged by how far the
        estimate moved from the earlier one: the measured loudness moves with it)."""
        kept_steps = StepFile(self.folder)
        limiting, estimate = self.estimate(kept.scale, kept_steps)
        holds = abs(kept.measured_lufs + estimate - kept.estimate_lufs - aim) <= KEPT_LOUDNESS_LU
        if not (limiting and holds):
            kept_steps.close()
        if not holds:
            return None
        return Gain(self.n, kept.scale, kept_steps if limiting else None), estimate

    def gain(self, aim: float) -> tuple[Gain, float]:
        """The gain aimed at ``aim`` LUFS, and its estimated loudness."""
        x = aim - self.loudness  # the gain in dB: a secant search on its estimated loudness
        limit = x + MAX_MAKEUP_DB
        current = self.estimate(float(db_to_gain(x)))[1]
        previous: tuple[float, float] | None = None
        for _ in range(12):
            if abs(current - aim) < 0.01 or x >= limit:
                break
            slope = 1.0 if previous is None else (current - previous[1]) / (x - previous[0])
            previous = (x, current)
            x = min(limit, x + (aim - current) / min(1.0, max(0.05, slope)))
            current = self.estimate(float(db_to_gain(x)))[1]
        kept = StepFile(self.folder)
        limiting, current = self.estimate(float(db_to_gain(x)), kept)
        if not limiting:
            kept.close()
        return Gain(self.n, float(db_to_gain(x)), kept if limiting else None), current


PARTS = ("mix", "bgm", "speech")


@dataclass(frozen=True)
class MixOutcome:
    """A levelled mix, as the plan and the gain that make it: ``mix == (voice + placed) *
    gain``. Rendered block by block (``blocks``) for each pass that needs it."""

    plan: Plan
    gain: Gain
    loudness_lufs: float
    true_peak_dbtp: float
    encodes: int = 0  # how many encodes the true-peak ceiling took (the mixer fills it in)

    def block(self, part: str, lo: int, hi: int) -> np.ndarray:
        made = {"mix": self.plan.mixed, "bgm": self.plan.placed, "speech": self.plan.voice}[part](lo, hi)
        made *= self.gain.block(lo, hi)[:, None]
        return made

    def blocks(self, part: str = "mix") -> Iterator[np.ndarray]:
        """The part ("mix", or as it sits in the mix: "bgm", "speech") a block at a time."""
        return in_order(lambda lo, hi: self.block(part, lo, hi), self.plan.ranges())

    def whole(self, part: str = "mix") -> np.ndarray:
        """The part as one array (tests and short clips: a long programme is rendered in blocks)."""
        return np.concatenate([np.zeros((0, 2), dtype=np.float32), *self.blocks(part)])

    @property
    def mix(self) -> np.ndarray:
        return self.whole("mix")

    @property
    def bgm(self) -> np.ndarray:
        return self.whole("bgm")

    @property
    def speech(self) -> np.ndarray:
        return self.whole("speech")

    def scaled(self, scale: float = 1.0, dips: np.ndarray | None = None) -> MixOutcome:
        """The same mix times ``scale`` and the per-frame ``dips``; the parts likewise."""
        return replace(self, gain=self.gain.times(scale, dips))


def measure(outcome: MixOutcome, true_peak: bool) -> tuple[float, float]:
    """The rendered mix's loudness and (where asked) true peak, in one pass."""
    meter = LoudnessMeter(2)
    peaks = dsp.PeakMeter()
    for block in outcome.blocks():
        meter.feed(block)
        if true_peak:
            peaks.feed(block)
    peaks.finish()
    return meter.integrated(), peaks.true_peak_db if true_peak else float("nan")


@dataclass(frozen=True)
class Levelled:
    """A mix levelled to its loudness target by estimate alone (no pass over the mix yet),
    and how to aim it again when what was measured missed."""

    outcome: MixOutcome
    leveller: Leveller | None
    target_lufs: float
    digests: np.ndarray | None = None  # per UNIT, the mix before the levelling gain (asked for)
    kept: KeptLevels | None = None  # the earlier mix's levels, where this mix kept them all
    gain_digests: np.ndarray | None = None  # per UNIT, ``outcome.gain`` (with ``digests``)

    def missed(self, measured_lufs: float) -> bool:
        return self.leveller is not None and abs(measured_lufs - self.target_lufs) > AIM_LU

    def release(self) -> None:
        """Remove the levelling's per-step energy and envelope once the gain is final (an
        hour's are 82 MiB each on disk); the gain itself stays with ``outcome``."""
        if self.leveller is not None:
            self.leveller.energy.close()
            if self.leveller.peaks is not None:
                self.leveller.peaks.close()

    def aimed_again(self, measured_lufs: float) -> MixOutcome:
        """The mix aimed again, corrected by how far the estimate was from ``measured_lufs``
        (hard limiting: the estimate reads low); its loudness is the new estimate."""
        assert self.leveller is not None
        gain, estimate = self.leveller.gain(self.target_lufs - (measured_lufs - self.outcome.loudness_lufs))
        return MixOutcome(self.outcome.plan, gain, estimate, float("nan"))


def mix_levelled(speech: Source, music: Source, levels: MixLevels, talking: np.ndarray, bgm_lufs: float,
                 folder: str | None = None, known: VoiceLoudness | None = None, kept: KeptLevels | None = None,
                 digests: bool = False, reuse: Reuse | None = None) -> Levelled:
    """The mix of ``speech`` and ``music`` (sources of the same length) with the speech
    activity (per 10 ms frame) and the music's loudness already known (the mixer takes them
    as tracks arrive), levelled by the leveller's estimate: the caller measures it as it
    encodes it and aims again if it missed (``Levelled``).

    The speech is gated to where someone talks, so what separation left of the old music is
    gone from the pauses. The levelling's per-step arrays wait in ``folder``; ``known``, the
    speech's loudness if measured already. With ``kept``, an earlier mix's levels, the bed
    and the levelling gain stay where that mix put them if they still hold (``reprise``),
    and with ``reuse`` too, what it measured of the units it leaves as they were is taken
    as it is; with ``digests``, the mix before the gain is digested per UNIT on the way.
    """
    made = plan(speech, music, levels, talking, bgm_lufs, known, None if kept is None else kept.bed_gain,
                hold=reuse is None)
    if kept is None or made.bed_gain != kept.bed_gain:
        reuse = None  # the bed moved: every unit's mix did
    leveller = Leveller(made, levels, folder, digests or reuse is not None, reuse)
    hashed = leveller.digests
    if leveller.loudness <= -70:
        return Levelled(MixOutcome(made, Gain(made.length, 1.0), leveller.loudness, float("nan")), None,
                        levels.loudness_lufs, hashed)
    if kept is not None and made.bed_gain == kept.bed_gain:
        held = leveller.kept_gain(levels.loudness_lufs, kept)
        if held is not None:
            return Levelled(MixOutcome(made, held[0], held[1], float("nan")), leveller, levels.loudness_lufs,
                            hashed, kept, None if hashed is None else held[0].unit_digests())
    gain, estimate = leveller.gain(levels.loudness_lufs)
    return Levelled(MixOutcome(made, gain, estimate, float("nan")), leveller, levels.loudness_lufs, hashed,
                    None, None if hashed is None else gain.unit_digests())


def mix_measured(speech: Source, music: Source, levels: MixLevels, talking: np.ndarray, bgm_lufs: float,
                 measure_peak: bool = True, folder: str | None = None) -> MixOutcome:
    """``mix_levelled``, measured (loudness and, with ``measure_peak``, true peak: NaN
    otherwise) and aimed again once if it missed."""
    levelled = mix_levelled(speech, music, levels, talking, bgm_lufs, folder)
    outcome = levelled.outcome
    current, peak = measure(outcome, measure_peak)
    if levelled.missed(current):
        outcome = levelled.aimed_again(current)
        current, peak = measure(outcome, measure_peak)
    return replace(outcome, loudness_lufs=current, true_peak_dbtp=peak)


def mix(speech: np.ndarray, bgm: np.ndarray, levels: MixLevels) -> MixOutcome:
    """speech (n, 2), bgm (n, 2), same length, 48 kHz -> the final stereo mix."""
    threshold = activity.threshold_for(levels.duck_sensitivity)
    talking = activity.detect(activity.speech_probability(speech.mean(axis=1)), threshold, speech.shape[0])
    return mix_measured(ArraySource(speech), ArraySource(bgm, speech.shape[0]), levels, talking,
                        dsp.loudness(bgm))


def _ducks(talking: np.ndarray, levels: MixLevels) -> tuple[np.ndarray, np.ndarray | None]:
    """Per frame, the whole music's duck and the speech band's further duck (None: none)."""
    wide_db = min(levels.duck_wide_db, levels.duck_db)
    duck = dsp.duck_frames(talking, levels, wide_db)
    return duck, None if wide_db >= levels.duck_db else dsp.duck_frames(talking, levels, levels.duck_db - wide_db)


def place_music(bgm: np.ndarray, talking: np.ndarray, levels: MixLevels, scale: float) -> np.ndarray:
    """The music as the mix places it (ducked, faded, times ``scale``), as one array."""
    n = bgm.shape[0]
    made = Plan(Silence(n), ArraySource(bgm), n, levels, activity.gate_frames(talking), *_ducks(talking, levels),
                scale)
    return np.concatenate([np.zeros((0, 2), dtype=np.float32), *in_order(made.placed, made.ranges())])
