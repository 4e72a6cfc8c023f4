"""A programme's last mix, kept so that mixing it again with edited music renders, measures
and encodes only what changed (a re-render from an edited timeline: ``bgm remix --project``).

Kept in the mixer's cache, under a key of everything but the music that decides the mix
(the speech as sent, the words and the speech activity, the levels, the length, the
bitrate, the mixing code itself): the levels the mix settled on (``render.KeptLevels``);
per UNIT (320 ms) a digest of the music, of the mix before the levelling gain and of the
levelling gain; the codec dips and the encoded frames' true peaks per 10 ms frame; the
levelling's energy and envelope per step; and the AAC stream. Each kept file's sha256 is
kept with the arrays: a file that does not match is never used.

A new mix under the same key keeps the bed gain and the levelling gain where they still
hold (``render.plan``, ``render.Leveller.kept_gain``). The units whose music changed, and
their neighbours, are rendered and measured again; every other unit's energy, envelope and
digest are the kept ones (``render.Reuse``). Every unit whose mix and gain digests match is
then the same samples as before, so its AAC frames are reused, and only the units around an
edit are encoded again, as a codec overshoot is patched (``aac.patched``): the creator hears
every span they did not touch exactly as before, and a 10-minute programme is neither
measured nor encoded whole again for one span.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from bgm import cache, vocab
from bgm.chunks import iter_file_chunks
from bgm.v1 import common_pb2
from services.mixer import aac, activity, dsp, render
from services.mixer.steps import StepFile

VERSION = 2  # of what is kept: a mixer that kept something else never reads it
# The code that makes and encodes the mix, by content: a mixer whose mixing changed (a new
# release, a local edit) never takes units from a mix that older code made.
MIXING_CODE = cache.key(*(Path(__file__).with_name(f"{name}.py").read_bytes()
                          for name in ("activity", "aac", "dsp", "encode", "render", "reprise", "sources", "steps")))
# Past this share of the programme changed, one whole encode (shared by the cores) is
# quicker than patching nearly everything.
MOST_CHANGED = 0.5
PARTS = ("score", "mixed", "gains", "dips", "peaks", "levels", "covered", "sha256")
FILES = ("stream", "energy", "envelope")
# A unit's mix depends on the music up to the speech-band filter's context away, and its
# envelope on the mix a little further (filter context, a 10 ms block beside a hot one):
# all within one unit, so the units next to one whose music changed are the only others
# whose mix or envelope can have.
assert render.BAND_MARGIN + dsp.CONTEXT + dsp.BLOCK <= render.UNIT


@dataclass(frozen=True)
class Reprise:
    levels: render.KeptLevels
    music: np.ndarray  # per UNIT: the music it was mixed with (``tracks.Music.digests``)
    mixed: np.ndarray  # per UNIT: the mix before the levelling gain (``render.UnitDigests``)
    gains: np.ndarray  # per UNIT: the levelling gain without its dips
    dips: np.ndarray  # per 10 ms frame: the codec dips the encode ended with
    peaks: np.ndarray  # per 10 ms frame: the encoded mix's true peak (linear)
    stream: aac.Stream  # the encoded mix, copied into the job's folder
    energy: StepFile  # per limiter step: the mix's K-weighted energy (``render.Leveller``)
    envelope: StepFile  # per limiter step: the mix's true-peak envelope, for gains up to ``covered``
    covered: float

    def reuse(self, music: np.ndarray | None) -> render.Reuse | None:
        """What a mix with ``music`` (its digests per UNIT) can take of this one as it is."""
        if music is None or music.shape != self.music.shape:
            return None
        changed = music != self.music
        dirty = changed.copy()
        dirty[1:] |= changed[:-1]
        dirty[:-1] |= changed[1:]
        return render.Reuse(dirty, self.mixed, self.energy, self.envelope, self.covered)

    def close(self) -> None:
        self.energy.close()
        self.envelope.close()


def key(speech_digest: str, speech_format: common_pb2.AudioFormat, words: list[tuple[float, float]],
        talking: np.ndarray, levels: dsp.MixLevels, n: int, bitrate: str) -> str:
    return cache.key("reprise", VERSION, MIXING_CODE, speech_digest,
                     speech_format.SerializeToString(deterministic=True),
                     np.asarray(words, dtype=np.float64).reshape(-1, 2), np.packbits(talking), repr(levels), n,
                     bitrate)


def units(n: int) -> int:
    return -(-n // render.UNIT)


def _step_pieces(steps: StepFile) -> Iterator[bytes]:
    for a in range(0, steps.length, render.CHUNK_STEPS):
        yield steps.read(a, a + render.CHUNK_STEPS).astype("<f4").tobytes()


def _appender(steps: StepFile) -> Callable[[bytes], None]:
    return lambda piece: steps.append(np.frombuffer(piece, dtype="<f4"))


def _hashed(pieces: Iterable[bytes], write: Callable[[bytes], object]) -> bytes:
    """Each piece handed to ``write``; the sha256 of them all."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
        write(piece)
    return digest.digest()


def load(store: cache.ArrayCache, name: str, n: int, folder: Path) -> Reprise | None:
    """The mix kept under ``name``, its stream copied into ``folder``; None when none is kept
    or what is kept does not fit together (evicted in part, another length)."""
    arrays = store.get_arrays(name)
    kept = {part: store.kept_file(f"{name}-{part}") for part in FILES}
    files = {part: path for part, path in kept.items() if path is not None}
    if arrays is None or len(files) < len(FILES) or any(part not in arrays for part in PARTS):
        return None
    frames, steps = activity.frames(n), -(-n // dsp.LIMITER_STEP)
    if (any(arrays[part].shape != (units(n),) for part in ("score", "mixed", "gains"))
            or any(arrays[part].shape != (frames,) for part in ("dips", "peaks"))
            or arrays["levels"].shape != (4,) or arrays["sha256"].shape != (len(FILES), 32)):
        return None
    target = folder / "mix.aac"
    energy, envelope = StepFile(str(folder)), StepFile(str(folder))
    try:
        with open(target, "wb") as out:
            shas = [_hashed(iter_file_chunks(files["stream"], vocab.MIB), out.write)]
        for part, steps_file in (("energy", energy), ("envelope", envelope)):
            shas.append(_hashed(iter_file_chunks(files[part], vocab.MIB), _appender(steps_file)))
        if [bytes(row) for row in arrays["sha256"]] != shas or energy.length != steps or envelope.length != steps:
            raise ValueError("the kept files are not the ones the arrays were kept with")
        stream = aac.Stream.read(target)
        if stream.count != -(-n // aac.FRAME) + 1:
            raise ValueError("the kept stream is not this programme's length")
    except (OSError, ValueError):
        target.unlink(missing_ok=True)
        energy.close()
        envelope.close()
        return None
    bed_gain, scale, estimate, measured = (float(v) for v in arrays["levels"])
    return Reprise(render.KeptLevels(bed_gain, scale, estimate, measured), arrays["score"], arrays["mixed"],
                   arrays["gains"], arrays["dips"].astype(np.float32), arrays["peaks"].astype(np.float32), stream,
                   energy, envelope, float(arrays["covered"]))


def _keep(store: cache.ArrayCache, name: str, pieces: Iterable[bytes]) -> bytes | None:
    """``pieces`` kept as one file under ``name``; their sha256 (None: not kept)."""
    with store.writing(name) as pending:
        if pending is None:
            return None
        sha = _hashed(pieces, pending.file.write)
        pending.keep = True
    return sha


def save(store: cache.ArrayCache, name: str, levelled: render.Levelled, music: np.ndarray,
         outcome: render.MixOutcome, stream: aac.Stream, measured_lufs: float, peaks: np.ndarray) -> None:
    """Keep this mix under ``name`` for the next (``outcome.loudness_lufs``: the leveller's
    estimate at its gain; ``music``: the music's digests per UNIT)."""
    leveller = levelled.leveller
    if levelled.digests is None or leveller is None or leveller.peaks is None:
        return
    n = outcome.plan.length
    dips = outcome.gain.dips if outcome.gain.dips is not None else np.ones(activity.frames(n), dtype=np.float32)
    levels = np.array([outcome.plan.bed_gain, outcome.gain.scale, outcome.loudness_lufs, measured_lufs])
    try:
        shas = [_keep(store, f"{name}-stream", iter_file_chunks(stream.path, vocab.MIB)),
                _keep(store, f"{name}-energy", _step_pieces(leveller.energy)),
                _keep(store, f"{name}-envelope", _step_pieces(leveller.peaks))]
    except OSError as exc:
        store.cannot_write(exc)
        return
    if any(sha is None for sha in shas):
        return
    # The gain's digests as the mix made them, unless the encode aimed it again since.
    gains = levelled.gain_digests
    if gains is None or replace(outcome.gain, dips=None) != levelled.outcome.gain:
        gains = outcome.gain.unit_digests()
    store.put_arrays(name, {"score": music, "mixed": levelled.digests, "gains": gains,
                            "dips": dips, "peaks": peaks.astype(np.float32), "levels": levels,
                            "covered": np.array(leveller.covered),
                            "sha256": np.array([np.frombuffer(sha, dtype=np.uint8) for sha in shas if sha])})


def changed_units(previous: Reprise, levelled: render.Levelled) -> np.ndarray:
    """Per UNIT, whether the new mix (before its dips) differs from the kept one there."""
    assert levelled.digests is not None and levelled.gain_digests is not None
    return np.asarray((levelled.digests != previous.mixed) | (levelled.gain_digests != previous.gains))


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
