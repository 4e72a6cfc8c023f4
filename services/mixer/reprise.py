"""A programme's last mix, kept so that mixing it again with edited music encodes only what
changed (a re-render from an edited timeline: ``bgm remix --project``).

Kept in the mixer's cache, under a key of everything but the music that decides the mix
(the speech as sent, the words, the levels, the length, the bitrate): the levels the mix
settled on (``render.KeptLevels``), per UNIT (320 ms) a digest of the mix before the
levelling gain and one of the levelling gain, the codec dips and the encoded frames' true
peaks per 10 ms frame, and the AAC stream itself.

A new mix under the same key keeps the bed gain and the levelling gain where they still
hold (``render.plan``, ``render.Leveller.kept_gain``). Every unit whose two digests match
is then the same samples as before, so its AAC frames are reused, and only the units around
an edit are encoded again, as a codec overshoot is patched (``aac.patched``): the creator
hears every span they did not touch exactly as before, and a 10-minute programme is not
encoded whole again for one span.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from bgm import cache
from bgm.v1 import common_pb2
from services.mixer import aac, activity, dsp, render

VERSION = 1  # of what is kept: a mixer that kept something else never reads it
# Past this share of the programme changed, one whole encode (shared by the cores) is
# quicker than patching nearly everything.
MOST_CHANGED = 0.5
PARTS = ("mixed", "gains", "dips", "peaks", "levels", "stream_sha256")


@dataclass(frozen=True)
class Reprise:
    levels: render.KeptLevels
    mixed: np.ndarray  # per UNIT: the mix before the levelling gain (``render.UnitDigests``)
    gains: np.ndarray  # per UNIT: the levelling gain without its dips
    dips: np.ndarray  # per 10 ms frame: the codec dips the encode ended with
    peaks: np.ndarray  # per 10 ms frame: the encoded mix's true peak (linear)
    stream: aac.Stream  # the encoded mix, copied into the job's folder


def key(speech_digest: str, speech_format: common_pb2.AudioFormat, words: list[tuple[float, float]],
        levels: dsp.MixLevels, n: int, bitrate: str) -> str:
    return cache.key("reprise", VERSION, speech_digest, speech_format.SerializeToString(deterministic=True),
                     np.asarray(words, dtype=np.float64).reshape(-1, 2), repr(levels), n, bitrate)


def units(n: int) -> int:
    return -(-n // render.UNIT)


def gain_digests(gain: render.Gain) -> np.ndarray:
    """Per UNIT, a digest of the levelling gain without its dips (made a block at a time)."""
    plain = replace(gain, dips=None)
    digests = render.UnitDigests()
    ranges = [(lo, min(gain.length, lo + render.BLOCK)) for lo in range(0, gain.length, render.BLOCK)]
    for block in render.in_order(plain.block, ranges):
        digests.feed(block)
    return digests.finish()


def load(store: cache.ArrayCache, name: str, n: int, folder: Path) -> Reprise | None:
    """The mix kept under ``name``, its stream copied into ``folder``; None when none is kept
    or what is kept does not fit together (evicted in part, another length)."""
    arrays = store.get_arrays(name)
    kept = store.kept_file(f"{name}-stream")
    if arrays is None or kept is None or any(part not in arrays for part in PARTS):
        return None
    frames = activity.frames(n)
    if (arrays["mixed"].shape != (units(n),) or arrays["gains"].shape != (units(n),)
            or arrays["dips"].shape != (frames,) or arrays["peaks"].shape != (frames,)
            or arrays["levels"].shape != (4,)):
        return None
    target = folder / "mix.aac"
    digest = hashlib.sha256()
    try:
        with open(kept, "rb") as source, open(target, "wb") as out:
            while piece := source.read(1 << 20):
                digest.update(piece)
                out.write(piece)
        if digest.digest() != arrays["stream_sha256"].tobytes():
            raise ValueError("the kept stream is not the one its arrays were kept with")
        stream = aac.Stream.read(target)
    except (OSError, ValueError):
        target.unlink(missing_ok=True)
        return None
    if stream.count != -(-n // aac.FRAME) + 1:
        target.unlink(missing_ok=True)
        return None
    bed_gain, scale, estimate, measured = (float(v) for v in arrays["levels"])
    return Reprise(render.KeptLevels(bed_gain, scale, estimate, measured), arrays["mixed"], arrays["gains"],
                   arrays["dips"].astype(np.float32), arrays["peaks"].astype(np.float32), stream)


def save(store: cache.ArrayCache, name: str, digests: np.ndarray, outcome: render.MixOutcome,
         stream: aac.Stream, measured_lufs: float, peaks: np.ndarray) -> None:
    """Keep this mix under ``name`` for the next (``outcome.loudness_lufs``: the leveller's
    estimate at its gain; ``digests``: the mix before the gain, per UNIT)."""
    n = outcome.plan.length
    dips = outcome.gain.dips if outcome.gain.dips is not None else np.ones(activity.frames(n), dtype=np.float32)
    levels = np.array([outcome.plan.bed_gain, outcome.gain.scale, outcome.loudness_lufs, measured_lufs])
    store.put_file(f"{name}-stream", stream.path)
    sha = np.frombuffer(bytes.fromhex(cache.file_digest(stream.path)), dtype=np.uint8)
    store.put_arrays(name, {"mixed": digests, "gains": gain_digests(outcome.gain), "dips": dips,
                            "peaks": peaks.astype(np.float32), "levels": levels, "stream_sha256": sha})


def changed_units(previous: Reprise, digests: np.ndarray, gain: render.Gain) -> np.ndarray:
    """Per UNIT, whether the new mix (before its dips) differs from the kept one there."""
    return np.asarray((digests != previous.mixed) | (gain_digests(gain) != previous.gains))


def patch_plan(changed: np.ndarray, old_dips: np.ndarray, n: int) -> tuple[list[aac.Region], np.ndarray]:
    """The regions to encode again, and the dips the new mix takes: the kept ones, but for a
    dip that reaches into a changed unit, dropped whole with its unit (a dip cut short would
    step; the new mix is measured and dipped again where it needs it)."""
    frames = old_dips.shape[0]
    mask = np.repeat(changed, render.UNIT // dsp.FRAME)[:frames]
    runs, count = ndimage.label(old_dips < 1.0)
    dips = old_dips.copy()
    if count:
        touched = np.unique(runs[mask & (runs > 0)])
        dropped = np.isin(runs, touched[touched > 0])
        mask |= dropped
        dips[dropped] = 1.0
    return aac.regions(mask, n), dips
