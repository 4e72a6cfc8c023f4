"""The levelled mix encoded under its true-peak ceiling.

Lossy codecs overshoot at transients (1.2-1.6 dB measured on speech onsets, and a long
programme nearly always has a frame or two over): the encoded audio itself is measured and
the mix dipped smoothly where it went over (``dsp.codec_dip_frames``). Turning the whole mix
down instead cost up to 1.4 LU of loudness; that stays as the last resort, which always
holds the ceiling. AAC is patched where it went over (``aac``); other codecs (Opus, for
WebM) are encoded whole again.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bgm import logs, media
from bgm.loudness import joined_loudness
from services.mixer import aac, activity, dsp, mux, render, reprise

RATE = dsp.SAMPLE_RATE
PATCH_ROUNDS = 3  # a patch can overshoot again (its own quantisation noise): measured and patched again
DIP_ROUNDS = 2  # whole encodes with dips before the last resort (codecs other than AAC)
LAST_RESORTS = 2  # whole encodes with the mix turned down
# ffmpeg's AAC encoder uses one core (8.5 s for 10 minutes here, most of the mix's tail): a
# long mix is encoded in shares at once, one per core, each at least MIN_SHARE long.
ENCODERS = min(4, os.cpu_count() or 1)
MIN_SHARE = 60 * RATE
log = logs.get("bgm.mixer")


@dataclass
class Spent:
    """Seconds spent encoding, checking and patching, and how often."""

    encode_s: float = 0.0
    check_s: float = 0.0
    patch_s: float = 0.0
    encodes: int = 0
    patches: int = 0
    last_resorts: int = 0
    reused: float = 0.0  # the share of a kept encode (``reprise``) that was reused

    def log(self) -> dict[str, float | int]:
        return {"encode_s": round(self.encode_s, 3), "check_s": round(self.check_s, 3),
                "patch_s": round(self.patch_s, 3), "encodes": self.encodes, "patches": self.patches,
                "last_resorts": self.last_resorts, "reused": round(self.reused, 3)}


@dataclass(frozen=True)
class Checked:
    """An encoded mix as measured: true peak per 10 ms frame (linear) and loudness."""

    frame_peaks: np.ndarray
    loudness_lufs: float

    @property
    def true_peak_dbtp(self) -> float:
        peak = float(self.frame_peaks.max(initial=0.0))
        return 20 * np.log10(peak) if peak > 0 else -240.0


class Measure:
    """True peak per 10 ms frame and loudness of the first ``n`` samples fed in pieces of any
    length (measured a BLOCK at a time: the peak meter takes whole 10 ms frames)."""

    def __init__(self, n: int, ceiling_db: float) -> None:
        self.n, self.got = n, 0
        self.peaks = dsp.PeakMeter(float(dsp.db_to_gain(ceiling_db)))
        self.meter = dsp.LoudnessMeter(2)
        self.pending: list[np.ndarray] = []
        self.held = 0

    def feed(self, piece: np.ndarray) -> None:
        piece = piece[: self.n - self.got - self.held]
        if piece.shape[0]:
            self.pending.append(piece)
            self.held += piece.shape[0]
        if self.held >= render.BLOCK:
            self._flush(render.BLOCK * (self.held // render.BLOCK))

    def _flush(self, count: int) -> None:
        joined = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        block, rest = joined[:count], joined[count:]
        self.pending, self.held = ([rest] if rest.shape[0] else []), rest.shape[0]
        self.got += block.shape[0]
        self.peaks.feed(block)
        self.meter.feed(block)

    def finish(self) -> np.ndarray:
        """The true peak per 10 ms frame."""
        if self.held:
            self._flush(self.held)
        self.peaks.finish()
        return self.peaks.frame_peaks(activity.frames(self.n))

    def result(self) -> Checked:
        return Checked(self.finish(), self.meter.integrated())


def joined(measures: list[Measure]) -> Checked:
    """What the measures of consecutive shares of a mix measure of the whole (each share but
    the last whole 10 ms frames and 100 ms steps long; ``aac.SHARE_GRID``). Each share's
    loudness filters start from silence: the 100 ms after a join is measured a little low,
    one step in 18,000 an hour."""
    if len(measures) == 1:
        return measures[0].result()
    peaks = np.concatenate([m.finish() for m in measures])
    return Checked(peaks, joined_loudness([m.meter for m in measures]))


def _mux_linked(original: Path, info: media.MediaInfo, stream: aac.Stream, out: mux.Output, target: Path) -> None:
    try:
        mux.mux_encoded(original, info, stream, out, target)
    finally:
        stream.path.unlink(missing_ok=True)


def _measure(blocks: Iterator[np.ndarray], n: int, ceiling_db: float) -> Checked:
    measure = Measure(n, ceiling_db)
    for block in blocks:
        measure.feed(block)
    return measure.result()


def _range_blocks(outcome: render.MixOutcome) -> Callable[[int, int], Iterator[np.ndarray]]:
    """The mix's samples [lo, hi) in blocks, made by the cores (``render.in_order``)."""
    def blocks(lo: int, hi: int) -> Iterator[np.ndarray]:
        return render.in_order(lambda a, b: outcome.block("mix", a, b),
                               [(a, min(hi, a + render.BLOCK)) for a in range(lo, hi, render.BLOCK)])
    return blocks


def _turned_down(outcome: render.MixOutcome, checked: Checked, ceiling_db: float) -> render.MixOutcome:
    return outcome.scaled(float(dsp.db_to_gain(ceiling_db - checked.true_peak_dbtp - 0.1)))


def reprised(levelled: render.Levelled, previous: reprise.Reprise, n: int, ceiling: float, bitrate: str,
             spent: Spent, candidate: Callable[[aac.Stream], None] | None = None
             ) -> tuple[render.MixOutcome, aac.Stream, Checked] | None:
    """The mix as the kept encode of an earlier mix of the programme with the units that
    changed encoded again (``reprise``), or None where it cannot be (the levels were not kept,
    or too much changed). The loudness is the earlier one moved by what the leveller's
    estimate moved. ``candidate`` gets the stream before it is measured."""
    if levelled.kept is None or levelled.digests is None:
        return None
    clock = time.monotonic()
    outcome = levelled.outcome
    changed = reprise.changed_units(previous, levelled)
    if changed.mean() > reprise.MOST_CHANGED:
        return None
    places, dips = reprise.patch_plan(changed, previous.dips, n)
    if (dips < 1.0).any():
        outcome = outcome.scaled(dips=dips)
    stream, peaks = previous.stream, previous.peaks.copy()
    if places:
        stream = aac.patched(stream, places, n, _range_blocks(outcome), bitrate)
        if candidate is not None:
            candidate(stream)
        for first, measured in aac.measured(stream, places, n, ceiling):
            peaks[first : first + measured.shape[0]] = measured
    spent.patches += len(places)
    spent.reused = 1.0 - sum(r.hi - r.lo for r in places) / n
    spent.patch_s += time.monotonic() - clock
    kept = levelled.kept
    return outcome, stream, Checked(peaks, kept.measured_lufs + outcome.loudness_lufs - kept.estimate_lufs)


def encode_aac(levelled: render.Levelled, n: int, ceiling_db: float, bitrate: str, folder: Path,
               spent: Spent, previous: reprise.Reprise | None = None,
               candidate: Callable[[aac.Stream], None] | None = None
               ) -> tuple[render.MixOutcome, aac.Stream, Checked]:
    """The mix as an ADTS stream with its true peak under ``ceiling_db``: the ``previous``
    encode of the programme with what changed encoded again where it can be (``reprised``),
    else encoded once (again only where the levelling's estimate missed the loudness); then
    patched where it went over. The loudness is the whole encode's: a patch dips a fraction
    of a second by a dB or so."""
    ceiling = float(dsp.db_to_gain(ceiling_db))

    def whole(made: render.MixOutcome) -> tuple[aac.Stream, Checked]:
        clock = time.monotonic()
        points = aac.share_points(n, ENCODERS, MIN_SHARE)
        bounds = [0, *points, n]
        measures = [Measure(b - a, ceiling_db) for a, b in itertools.pairwise(bounds)]
        stream = aac.encode_shares(_range_blocks(made), n, folder / "mix.aac", bitrate, points,
                                   lambda i: measures[i].feed)
        checked = joined(measures)
        for first, measured in aac.measured(stream, [aac.Region(p, p) for p in points], n, ceiling):
            checked.frame_peaks[first : first + measured.shape[0]] = measured
        spent.encode_s += time.monotonic() - clock
        spent.encodes += 1
        return stream, checked

    again = None if previous is None else reprised(levelled, previous, n, ceiling, bitrate, spent, candidate)
    if again is not None:
        outcome, stream, checked = again
    else:
        outcome = levelled.outcome
        stream, checked = whole(outcome)
        if levelled.missed(checked.loudness_lufs):
            outcome = levelled.aimed_again(checked.loudness_lufs)
            stream, checked = whole(outcome)
    peaks = checked.frame_peaks.copy()
    clock = time.monotonic()
    for _ in range(PATCH_ROUNDS):
        if peaks.max(initial=0.0) <= ceiling:
            break
        dips = dsp.codec_dip_frames(peaks, ceiling_db)
        outcome = outcome.scaled(dips=dips)
        places = aac.regions(dips < 1.0, n)
        stream = aac.patched(stream, places, n, _range_blocks(outcome), bitrate)
        for first, measured in aac.measured(stream, places, n, ceiling):
            peaks[first : first + measured.shape[0]] = measured
        spent.patches += len(places)
    spent.patch_s += time.monotonic() - clock
    checked = Checked(peaks, checked.loudness_lufs)
    for _ in range(LAST_RESORTS):
        if checked.true_peak_dbtp <= ceiling_db:
            break
        outcome = _turned_down(outcome, checked, ceiling_db)
        stream, checked = whole(outcome)
        spent.last_resorts += 1
    return outcome, stream, checked


def encode_whole(levelled: render.Levelled, n: int, ceiling_db: float, bitrate: str, original: Path,
                 info: media.MediaInfo, out: mux.Output, target: Path, spent: Spent
                 ) -> tuple[render.MixOutcome, Checked]:
    """The mix encoded and muxed into ``target``, whole, again with dips where it went over
    (a codec whose frames cannot be patched), or aimed again where the levelling's estimate
    missed the loudness."""
    def encoded(made: render.MixOutcome) -> Checked:
        clock = time.monotonic()
        mux.mux(original, info, made.blocks(), out, target, bitrate)
        spent.encode_s += time.monotonic() - clock
        spent.encodes += 1
        clock = time.monotonic()
        checked = _measure(media.decode_audio_blocks(target, RATE, 2, render.BLOCK, "the remixed file"), n,
                           ceiling_db)
        spent.check_s += time.monotonic() - clock
        return checked

    outcome = levelled.outcome
    checked = encoded(outcome)
    if levelled.missed(checked.loudness_lufs):
        outcome = levelled.aimed_again(checked.loudness_lufs)
        checked = encoded(outcome)
    for attempt in range(DIP_ROUNDS + LAST_RESORTS):
        if checked.true_peak_dbtp <= ceiling_db:
            break
        outcome = (outcome.scaled(dips=dsp.codec_dip_frames(checked.frame_peaks, ceiling_db)) if attempt < DIP_ROUNDS
                   else _turned_down(outcome, checked, ceiling_db))
        checked = encoded(outcome)
    return outcome, checked


Keep = Callable[[render.MixOutcome, aac.Stream, Checked], None]


def encoded_within_ceiling(levelled: render.Levelled, n: int, ceiling_db: float, bitrate: str, original: Path,
                           info: media.MediaInfo, out: mux.Output, target: Path, folder: Path, spent: Spent,
                           previous: reprise.Reprise | None = None, keep: Keep | None = None,
                           encoded: Callable[[], None] | None = None) -> tuple[render.MixOutcome, Checked]:
    """The mix encoded under the ceiling and muxed with the original's picture into
    ``target``; the outcome as encoded (with its dips) and what the encoded audio measures.
    An AAC mix is encoded from the ``previous`` one where it can be, and handed to ``keep``
    (for the next) unless only the last resort held its ceiling. ``encoded`` is called once
    the AAC stream is final, before the mux: what only the encode needed can go then."""
    if out.audio_codec == "aac":
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bgm-early-mux") as pool:
            early: list[tuple[aac.Stream, Path, Future[None]]] = []

            def mux_early(stream: aac.Stream) -> None:
                # A patched stream is muxed while it is measured: kept if it needs no patch
                # after all. The mux reads a link to this version (a patch replaces the name).
                source, made = (target.with_name(f"early-{len(early)}{suffix}") for suffix in (".aac", out.suffix))
                os.link(stream.path, source)
                early.append((stream, made, pool.submit(_mux_linked, original, info,
                                                        aac.Stream(source, stream.starts), out, made)))

            outcome, stream, checked = encode_aac(levelled, n, ceiling_db, bitrate, folder, spent, previous,
                                                  mux_early)
            if keep is not None and not spent.last_resorts:
                keep(outcome, stream, checked)
            if encoded is not None:
                encoded()
            clock = time.monotonic()
            for version, made, muxing in early:
                if muxing.exception() is None and version is stream:  # waits for it
                    os.replace(made, target)
                made.unlink(missing_ok=True)
            if not target.exists():
                mux.mux_encoded(original, info, stream, out, target)
            spent.encode_s += time.monotonic() - clock
        stream.path.unlink()
    else:
        outcome, checked = encode_whole(levelled, n, ceiling_db, bitrate, original, info, out, target, spent)
    if checked.true_peak_dbtp > ceiling_db:
        log.warning("true peak over the ceiling after the last resort",
                    extra={"fields": {"true_peak_dbtp": round(checked.true_peak_dbtp, 2), "ceiling": ceiling_db}})
    return outcome, checked
