"""A re-render through a mixer that keeps its last mix (``services/mixer/reprise.py``): the
same programme mixed again with one stretch of its music edited comes back with every other
stretch decoding to the same samples as the first run, at its loudness and under its
ceiling; a mixer without the cache, or a changed level, mixes afresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from bgm.settings import ServerSettings
from bgm.v1 import mixer_pb2, mixer_pb2_grpc
from services.mixer import dsp
from services.mixer.servicer import MixerServicer
from services.mixer.settings import MixerSettings
from tests.conftest import channel, speak, start
from tests.media_files import colour_video, decode
from tests.test_mixer import TEXT, mix_and_mux, reference_loudness, separate

RATE = 48_000
EDIT = (7.0, 10.0)  # seconds: the stretch whose music the second run changes
MARGIN_S = 1.5  # around it: re-encoded with context (whole 320 ms units and a unit more each side)


@pytest.fixture(scope="module")
def programme(tmp_path_factory):
    """A video, its separated speech, its score, and the score with EDIT replaced."""
    import immich_memories_music

    tmp = tmp_path_factory.mktemp("reprise")
    first, second = (decode(speak(text, tmp / f"speech{i}.wav"))[:, 0] for i, text in enumerate(TEXT))
    speech = np.concatenate([np.zeros(RATE), first, np.zeros(2 * RATE), second, np.zeros(RATE)]).astype(np.float32)
    n = speech.shape[0]
    tracks = Path(immich_memories_music.__file__).parent / "tracks"
    score = decode(sorted(tracks.glob("energetic/*.opus"))[0])[:n, 0] * 0.3
    other = decode(sorted(tracks.glob("calm/*.opus"))[0])[:n, 0] * 0.3
    edited = score.copy()
    a, b = (round(t * RATE) for t in EDIT)
    fade = np.linspace(0.0, 1.0, RATE // 10)
    edited[a:b] = other[a:b]
    edited[a : a + fade.shape[0]] = score[a : a + fade.shape[0]] * fade[::-1] + other[a : a + fade.shape[0]] * fade
    soundfile.write(tmp / "orig.wav", speech + score, RATE)
    video = colour_video(tmp / "clip.mp4", n / RATE, tmp / "orig.wav")
    return tmp, video, speech + score, score.astype(np.float32), edited.astype(np.float32)


def mixer_with(loop, cache_dir: str):
    running = start(loop, [MixerServicer(MixerSettings(cache_dir=cache_dir), ServerSettings())])
    return mixer_pb2_grpc.MixerStub(channel(running.address)), running


def remixed(stub, tmp: Path, video: Path, speech: np.ndarray, score: np.ndarray, name: str,
            options: mixer_pb2.MixOptions | None = None) -> tuple[mixer_pb2.MixResult, np.ndarray]:
    result, media, _ = mix_and_mux(stub, video, speech, score, options)
    path = tmp / name
    path.write_bytes(media)
    return result, decode(path, RATE, 2)


def outside(n: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[round((EDIT[0] - MARGIN_S) * RATE) : round((EDIT[1] + MARGIN_S) * RATE)] = False
    return keep


def inside(n: int) -> slice:
    return slice(round(EDIT[0] * RATE), round(EDIT[1] * RATE))


def test_an_edited_stretch_is_all_that_is_encoded_again(loop, programme, tmp_path):
    tmp, video, recording, score, edited = programme
    stub, running = mixer_with(loop, str(tmp_path / "cache"))
    try:
        speech = separate(stub, recording)[mixer_pb2.STEM_SPEECH]
        first_result, first = remixed(stub, tmp, video, speech, score, "first.mp4")
        second_result, second = remixed(stub, tmp, video, speech, edited, "second.mp4")
        # Back to the first score: the edit undone is encoded again in turn, the rest still reused.
        third_result, third = remixed(stub, tmp, video, speech, score, "third.mp4")
        # Nothing changed: the kept mix is the remix, whole.
        _, same = remixed(stub, tmp, video, speech, score, "same.mp4")
        # A level changed: nothing of the kept mix fits, the programme is mixed afresh.
        louder = mixer_pb2.MixOptions(bgm_gain_db=-10.0)
        _, changed = remixed(stub, tmp, video, speech, edited, "louder.mp4", louder)
    finally:
        loop.run(running.stop(0))
    n = min(first.shape[0], second.shape[0], third.shape[0], changed.shape[0])
    first, second, third, changed = first[:n], second[:n], third[:n], changed[:n]
    keep = outside(n)
    print(f"\nsame samples outside the edit: {np.mean(second[keep] == first[keep]):.4f} (second), "
          f"{np.mean(third[keep] == first[keep]):.4f} (third)")
    assert np.array_equal(second[keep], first[keep])
    assert np.array_equal(third[keep], first[keep])
    assert np.array_equal(same, third[: same.shape[0]]) and same.shape[0] == n
    assert not np.array_equal(second[inside(n)], first[inside(n)])
    assert not np.allclose(changed[keep], second[keep], atol=1e-3)
    # A mix aimed afresh lands within 0.1 LU of its target; one that keeps the first run's
    # levels, within EBU R128's 0.5 LU (render.KEPT_LOUDNESS_LU), and says where it landed.
    for result, audio, within in ((first_result, first, 0.2), (second_result, second, 0.6),
                                  (third_result, third, 0.6)):
        lufs, peak = reference_loudness(audio), dsp.true_peak_db(audio)
        print(f"  {lufs:.2f} LUFS (reported {result.loudness_lufs:.2f}), {peak:.2f} dBTP "
              f"(reported {result.true_peak_dbtp:.2f})")
        assert abs(lufs + 14.0) <= within and result.loudness_lufs == pytest.approx(lufs, abs=0.1)
        assert peak <= -1.0 and result.true_peak_dbtp == pytest.approx(peak, abs=0.1)


def test_without_a_kept_mix_the_same_edit_changes_every_sample(loop, programme):
    """The case above is not the codec's doing: a mixer that keeps nothing levels the edited
    programme afresh, and the stretches that were not edited come out different."""
    tmp, video, recording, score, edited = programme
    stub, running = mixer_with(loop, "")
    try:
        speech = separate(stub, recording)[mixer_pb2.STEM_SPEECH]
        _, first = remixed(stub, tmp, video, speech, score, "plain-first.mp4")
        _, second = remixed(stub, tmp, video, speech, edited, "plain-second.mp4")
    finally:
        loop.run(running.stop(0))
    n = min(first.shape[0], second.shape[0])
    keep = outside(n)
    print(f"\nwithout a kept mix, same samples outside the edit: {np.mean(second[:n][keep] == first[:n][keep]):.4f}")
    assert not np.array_equal(second[:n][keep], first[:n][keep])


def test_what_is_reused_is_what_a_whole_pass_would_measure(programme, tmp_path):
    """The levelling of an edited programme that takes the units it leaves as they were from
    the earlier mix (``render.Reuse``) measures what a whole pass over it measures: the same
    digest for every unit, the same envelope, and the loudness within 0.01 LU, while it
    renders again only the units near the edit."""
    from services.mixer import activity, render, reprise
    from services.mixer.sources import ArraySource

    _, _, _, score, edited = programme
    speech = np.stack([programme[2] - score] * 2, axis=1)  # the recording less its score: the speech
    n = speech.shape[0]
    levels = dsp.MixLevels(duck_db=12, loudness_lufs=-14, true_peak_dbtp=-1, fade_in_s=0.5, fade_out_s=1.0,
                           attack_ms=80, release_ms=400, bgm_gain_db=-2)
    threshold = activity.threshold_for(levels.duck_sensitivity)
    talking = activity.detect(activity.speech_probability(speech.mean(axis=1)), threshold, n)

    def music_digests(music: np.ndarray) -> np.ndarray:
        units = render.UnitDigests()
        units.feed(np.stack([music] * 2, axis=1))
        return units.finish()

    def levelled(music: np.ndarray, kept=None, reuse=None) -> render.Levelled:
        return render.mix_levelled(ArraySource(speech), ArraySource(music, n), levels, talking,
                                   dsp.loudness(score), str(tmp_path), kept=kept, digests=True, reuse=reuse)

    first = levelled(score)
    assert first.leveller is not None and first.leveller.peaks is not None and first.digests is not None
    kept = render.KeptLevels(first.outcome.plan.bed_gain, first.outcome.gain.scale, first.outcome.loudness_lufs,
                             first.outcome.loudness_lufs)
    earlier = reprise.Reprise(kept, music_digests(score), first.digests, np.zeros(0), np.zeros(0), np.zeros(0),
                              None, first.leveller.energy, first.leveller.peaks,  # type: ignore[arg-type]
                              first.leveller.covered)
    reuse = earlier.reuse(music_digests(edited))
    assert reuse is not None
    print(f"\nunits measured again: {reuse.dirty.mean():.3f}")
    assert 0.05 < reuse.dirty.mean() < 0.5
    again = levelled(edited, kept, reuse)
    whole = levelled(edited, kept)
    assert again.kept is not None and whole.kept is not None  # both kept the first run's levels
    assert again.leveller is not None and whole.leveller is not None
    assert np.array_equal(again.digests, whole.digests)
    assert not np.array_equal(again.digests, first.digests)
    assert again.leveller.loudness == pytest.approx(whole.leveller.loudness, abs=0.01)
    assert again.outcome.loudness_lufs == pytest.approx(whole.outcome.loudness_lufs, abs=0.01)
    # The envelope of the whole edited mix, oversampled near the same level as the earlier one.
    peaks_again = again.leveller.peaks
    assert peaks_again is not None and again.leveller.covered == reuse.covered
    near = whole.leveller.ceiling / reuse.covered * float(dsp.db_to_gain(-dsp.OVERSAMPLE_MARGIN_DB))
    peaks_whole = whole.leveller._envelope(near)
    clean = np.repeat(~reuse.dirty, render.UNIT // dsp.LIMITER_STEP)[: peaks_whole.length]
    envelope_again, envelope_whole = peaks_again.read(0, peaks_again.length), peaks_whole.read(0, peaks_whole.length)
    assert np.array_equal(envelope_again[clean], envelope_whole[clean])
    hot = envelope_whole > near  # where the limiter may act: true peaks in both
    ratio = envelope_again[~clean] / np.maximum(envelope_whole[~clean], 1e-12)
    print(f"dirty units: envelope ratio {ratio.min():.4f}..{ratio.max():.4f} (under the oversampling level "
          f"one may be a sample peak where the other is a true peak); {hot.sum()} steps over it")
    assert np.allclose(envelope_again[hot], envelope_whole[hot], rtol=1e-3)


def test_a_damaged_kept_mix_is_mixed_afresh(loop, programme, tmp_path):
    """A kept stream that no longer matches what was kept with it (a disk fault, a hand edit)
    is never spliced into: the edited programme is mixed afresh, and correctly."""
    tmp, video, recording, score, edited = programme
    folder = tmp_path / "cache"
    stub, running = mixer_with(loop, str(folder))
    try:
        speech = separate(stub, recording)[mixer_pb2.STEM_SPEECH]
        _, first = remixed(stub, tmp, video, speech, score, "kept-first.mp4")
        streams = sorted(folder.glob("*-stream.raw"))
        assert len(streams) == 1
        data = bytearray(streams[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        streams[0].write_bytes(bytes(data))
        _, second = remixed(stub, tmp, video, speech, edited, "kept-second.mp4")
    finally:
        loop.run(running.stop(0))
    stub, running = mixer_with(loop, "")
    try:
        _, fresh = remixed(stub, tmp, video, speech, edited, "fresh.mp4")
    finally:
        loop.run(running.stop(0))
    assert np.array_equal(second, fresh)  # the same as a mixer that kept nothing
    n = min(first.shape[0], second.shape[0])
    assert not np.array_equal(second[:n][outside(n)], first[:n][outside(n)])
    lufs = reference_loudness(second)
    assert abs(lufs + 14.0) <= 0.2 and dsp.true_peak_db(second) <= -1.0
