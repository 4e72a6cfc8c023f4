"""The music service's composer: real music, the intended tempo and mode, exact lengths,
determinism, bar-line transitions, and bad input."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

from bench.musicality import estimate_key, fifths_apart
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, music_pb2, music_pb2_grpc
from services.music.composer import BEATS_PER_BAR, ComposerBackend, plan
from services.music.servicer import MusicServicer
from services.music.settings import MusicSettings
from services.music.styles import MAJOR, STYLES
from tests.conftest import channel, health_status, start

RATE = 44_100
EMOTION_ENUM = {name: common_pb2.Emotion.Value(f"EMOTION_{name.upper()}") for name in STYLES}


@pytest.fixture(scope="module")
def composer():
    return ComposerBackend()


def key_of(mono: np.ndarray) -> tuple[int, bool]:
    """Krumhansl-Schmuckler key estimate on librosa's chroma (bench.musicality)."""
    import librosa

    return estimate_key(librosa.resample(mono, orig_sr=RATE, target_sr=22_050), 22_050)


@pytest.mark.parametrize("emotion", list(STYLES))
def test_each_emotion_renders_real_music_at_its_tempo(composer, emotion):
    import librosa

    audio, tempo = composer.generate([(emotion, 0.0, 20.0)], sample_rate=RATE, seed=7, tempo=None)
    assert audio.shape == (20 * RATE, 2)
    mono = audio.mean(axis=1)
    rms = float(np.sqrt((mono**2).mean()))
    flatness = float(np.median(librosa.feature.spectral_flatness(y=mono)))
    assert rms > 0.01, "silence"
    assert flatness < 0.1, "noise-like spectrum"
    found = float(np.atleast_1d(librosa.beat.beat_track(y=mono, sr=RATE)[0])[0])
    print(f"\n{emotion}: intended {tempo:.1f} BPM, beat tracker {found:.1f} BPM, rms {rms:.3f}")
    assert abs(found - tempo) / tempo <= 0.05
    assert abs(tempo - STYLES[emotion].tempo) / STYLES[emotion].tempo <= 0.05
    style = STYLES[emotion]
    intended, heard = (style.tonic % 12, style.mode == MAJOR), key_of(mono)
    # The key the style names, or its relative; anger's power chords (no thirds) pass for
    # E major as well as E minor, so the tonic alone counts there.
    assert fifths_apart(heard, intended) == 0 or heard[0] == intended[0], (heard, intended)
    if emotion == "joy":
        assert heard[1]
    if emotion == "sadness":
        assert not heard[1]


def test_every_change_of_emotion_moves_to_a_related_key():
    keys = [(style.tonic % 12, style.mode == MAJOR) for style in STYLES.values()]
    assert max(fifths_apart(a, b) for a in keys for b in keys) <= 2
    assert fifths_apart((2, True), (5, False)) == 6 and fifths_apart((0, True), (9, False)) == 0  # the measure


def test_same_seed_same_audio_other_seed_other_audio(composer):
    spans = [("joy", 0.0, 6.0), ("fear", 6.0, 12.0)]
    a, _ = composer.generate(spans, sample_rate=RATE, seed=3, tempo=None)
    b, _ = composer.generate(spans, sample_rate=RATE, seed=3, tempo=None)
    c, _ = composer.generate(spans, sample_rate=RATE, seed=4, tempo=None)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_transitions_fall_on_the_new_spans_downbeat():
    spans = [("joy", 0.0, 9.3), ("sadness", 9.3, 21.7), ("anger", 21.7, 30.0)]
    plans = plan(spans)
    for p, (emotion, begin, end) in zip(plans, spans, strict=True):
        times = p.beat_times()
        assert times.shape[0] == p.beats + 1 and times[-1] == pytest.approx(end - begin, abs=1e-9)
        assert p.bars == -(-p.beats // BEATS_PER_BAR)
        # Whole beats, not whole bars: the body's tempo moves by at most a beat over the span.
        assert abs(p.tempo - STYLES[emotion].tempo) <= p.tempo / p.beats + 1e-9

    from services.music.composer import compose

    score = compose(plans, seed=1)
    onsets = sorted({round(n.start, 6) for inst in score.instruments for n in inst.notes})
    for boundary in (9.3, 21.7):
        assert round(boundary, 6) in onsets  # the new section starts exactly on its first downbeat


def test_the_tempo_glides_across_a_join_and_each_span_still_stands_alone():
    """Where one emotion's span meets another's, the beats slow or quicken a little at a time
    through PIVOT_BPM (no beat more than 10 % longer or shorter than the one before, where
    joy's 120 meeting sadness's 72 was a 40 % jump), in the notes the composer writes; the
    span bodies keep their styles' tempos; a span alone, or with one tempo asked for, keeps
    one tempo; and each span's plan depends on whether it has neighbours, not on which."""
    from services.music.composer import PIVOT_BPM, beat_tempos, compose

    spans = [("joy", 0.0, 12.0), ("sadness", 12.0, 28.0), ("anger", 28.0, 40.0)]
    plans = plan(spans)
    assert [(p.ramp_in, p.ramp_out) for p in plans] == [(False, True), (True, True), (True, False)]
    lengths = np.concatenate([np.diff(p.beat_times()) for p in plans])
    ratios = lengths[1:] / lengths[:-1]
    assert ratios.max() <= 1.1 and ratios.min() >= 1 / 1.1, (ratios.min(), ratios.max())
    for p in plans:
        assert abs(p.tempo - STYLES[p.emotion].tempo) <= 0.05 * STYLES[p.emotion].tempo
        tempos = beat_tempos(p.beats, p.tempo, p.ramp_in, p.ramp_out)
        assert np.all(tempos[4:-4] == p.tempo)  # the body: one tempo
        for edge, ramped in ((tempos[0], p.ramp_in), (tempos[-1], p.ramp_out)):
            assert (abs(edge - PIVOT_BPM) < abs(p.tempo - PIVOT_BPM) / 4 + 1e-9) == ramped
    # The notes follow: the kick and snare of sadness's glide bar land on its uneven beats.
    score = compose(plans, seed=1)
    sad = plans[1]
    downbeats = sad.start_s + sad.beat_times()[:5]
    onsets = {round(n.start, 6) for inst in score.instruments if inst.is_drum for n in inst.notes}
    assert sum(round(t, 6) in onsets for t in downbeats[:4]) >= 2
    # Alone or at one asked-for tempo: no glide. With neighbours: the same plan whatever they are.
    alone = plan([spans[1]])[0]
    assert not (alone.ramp_in or alone.ramp_out) and np.allclose(np.diff(alone.beat_times()), 60 / alone.tempo)
    assert not any(p.ramp_in or p.ramp_out for p in plan(spans, tempo_override=100.0))
    other = plan([("fear", 0.0, 3.0), ("sadness", 3.0, 19.0), ("surprise", 19.0, 25.0)])[1]
    mine = plan([("sadness", 0.0, 16.0)], joined=(True, True))[0]
    assert other.tempo == pytest.approx(sad.tempo) == pytest.approx(mine.tempo) and other.beats == sad.beats


def test_the_glide_is_heard_in_the_render(composer):
    """In the audio, not only the notes: sadness's first beats after joy (kick and ride on
    every beat) are heard where the glide from 100 BPM puts them, which by the fifth beat is
    half a second from where its body tempo would."""
    import librosa

    rate = 22_050
    spans = [("joy", 0.0, 12.0), ("sadness", 12.0, 28.0)]
    music, _ = composer.generate(spans, sample_rate=rate, seed=2, tempo=None)
    sad = plan(spans)[1]
    glide = sad.beat_times()[:5]
    steady = np.arange(5) * sad.beat_s
    assert abs(glide[-1] - steady[-1]) > 0.4
    lo = round(11.5 * rate)
    onsets = librosa.onset.onset_detect(y=music[lo : lo + 5 * rate].mean(axis=1), sr=rate, units="time") - 0.5
    onsets -= onsets[np.argmin(np.abs(onsets))]  # the detector's latency, from the join's downbeat

    def heard(times: np.ndarray) -> int:
        return sum(bool(np.min(np.abs(onsets - t)) < 0.03) for t in times)

    assert heard(glide) >= 4, (onsets, glide)
    assert heard(steady[2:]) <= 1, (onsets, steady)


ALL_SEVEN = [(e, 8.0 * i, 8.0 * (i + 1)) for i, e in enumerate(
    ("joy", "sadness", "disgust", "anger", "surprise", "fear", "neutral"))]


def test_every_note_plays_with_its_own_instrument_when_all_seven_emotions_sound(tmp_path):
    """21 melodic instruments over a timeline: each note must sound with its instrument's
    program on its channel (pretty_midi's writer reused channels past 15 and swapped sounds)."""
    import mido

    from services.music import midi
    from services.music.composer import compose

    score = compose(plan(ALL_SEVEN), seed=3)
    assert len([i for i in score.instruments if not i.is_drum]) > len(midi.MELODIC_CHANNELS)
    path = tmp_path / "score.mid"
    placements = midi.write(score, path)
    intended = {}
    for placement, track in zip(placements, mido.MidiFile(str(path)).tracks[1:], strict=True):
        tick = 0
        for message in track:
            tick += message.time
            if message.type == "note_on":
                intended.setdefault(tick, []).append((message.channel, placement.instrument))
    program = {}  # the program each channel has, as a synthesiser follows the file
    events = []
    for track in mido.MidiFile(str(path)).tracks[1:]:
        tick = 0
        for message in track:
            tick += message.time
            events.append((tick, 0 if message.type == "program_change" else 1, message))
    checked = 0
    for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
        if message.type == "program_change":
            program[message.channel] = message.program
        elif message.type == "note_on" and message.channel != midi.DRUM_CHANNEL:
            owners = [inst for ch, inst in intended[tick] if ch == message.channel]
            assert owners and all(program[message.channel] == inst.program for inst in owners)
            checked += 1
    assert checked > 300  # the notes of 21 instruments, not a handful
    assert all(p.channel == midi.DRUM_CHANNEL for p in placements if p.instrument.is_drum)


def test_a_section_sounds_the_same_alone_and_in_a_long_timeline(composer):
    from services.music.backends import span_seed

    rate = 22_050
    emotion, start, end = ALL_SEVEN[0]
    alone = composer.render_span(emotion, round(end * rate), sample_rate=rate, seed=span_seed(3, start), tempo=None,
                                 joined=(False, True))  # a span follows: its last bar glides
    together, _ = composer.generate(ALL_SEVEN, sample_rate=rate, seed=3, tempo=None)
    part = slice(0, 6 * rate)  # before the first change
    a, b = alone[part].mean(axis=1), together[part].mean(axis=1)
    correlation = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert correlation > 0.9, correlation


def test_in_process_renders_are_what_the_fluidsynth_command_writes_even_side_by_side(tmp_path):
    """The resident synth (services/music/synth.py) against ``fluidsynth -F`` on the same MIDI
    file and settings, and two renders at once in threads against one alone."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import soundfile

    from services.music import midi
    from services.music.composer import compose, soundfont, synthesizer

    rate, frames = 48_000, 6 * 48_000
    path = tmp_path / "score.mid"
    midi.write(compose(plan(ALL_SEVEN[:2]), seed=5), path)
    subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(rate), "-O", "float",
                    "-o", "synth.reverb.active=1", "-o", "synth.chorus.active=0",
                    "-F", str(tmp_path / "cli.wav"), soundfont(), str(path)], check=True, timeout=120)
    cli, _ = soundfile.read(tmp_path / "cli.wav", dtype="float32", always_2d=True)
    data = path.read_bytes()
    alone = synthesizer().render(data, frames, rate)
    assert np.abs(alone).max() > 0.05
    assert np.array_equal(alone, cli[:frames])
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: synthesizer().render(data, frames, rate), range(2)))
    assert all(np.array_equal(alone, other) for other in both)


@pytest.fixture(scope="module")
def music(loop):
    running = start(loop, [MusicServicer(MusicSettings(), ServerSettings(max_duration_s=600))])
    yield music_pb2_grpc.MusicGeneratorStub(channel(running.address)), running
    loop.run(running.stop(0))


def timeline(*spans: tuple[str, float, float]) -> list[common_pb2.EmotionSpan]:
    return [common_pb2.EmotionSpan(emotion=EMOTION_ENUM[e], span=common_pb2.TimeSpan(start_s=s, end_s=t))
            for e, s, t in spans]


def test_generated_audio_fits_the_timeline_to_the_sample_and_is_tagged(music):
    stub, _ = music
    spans = timeline(("joy", 0.0, 7.25), ("sadness", 7.25, 12.0))
    events = list(stub.Generate(music_pb2.GenerateRequest(spans=spans), timeout=120))
    header = events[0].header
    assert header.format.sample_rate_hz == RATE and header.format.channels == 2
    assert header.total_samples == 12 * RATE
    fitted = [p.tempo for p in plan([("joy", 0.0, 7.25), ("sadness", 7.25, 12.0)])]  # joy glides into sadness
    assert list(header.span_tempos_bpm) == pytest.approx(fitted, rel=1e-5)
    assert header.tempo_bpm == pytest.approx(fitted[0], rel=1e-5)
    chunks = [e.chunk for e in events[1:]]
    assert all(len(c.pcm) <= 512 * 1024 for c in chunks)
    position = 0
    for c in chunks:
        assert c.start_sample == position
        position += len(c.pcm) // 8
        expected = 0 if c.start_sample < round(7.25 * RATE) else 1
        assert c.span_index == expected and c.emotion == spans[expected].emotion
    assert position == 12 * RATE
    pcm = np.frombuffer(b"".join(c.pcm for c in chunks), dtype="<f4")
    assert np.isfinite(pcm).all() and np.abs(pcm).max() <= 1.0


@pytest.mark.parametrize(("spans", "fragment"), [
    ([], "timeline is empty"),
    ([common_pb2.EmotionSpan(emotion=0, span=common_pb2.TimeSpan(start_s=0, end_s=5))], "unknown emotion"),
    (timeline(("joy", 0, 5), ("fear", 6, 10)), "(a hole)"),
    (timeline(("joy", 0, 5), ("fear", 4, 10)), "(an overlap)"),
    (timeline(("joy", 1, 5)), "starting at 0"),
    (timeline(("joy", 0, 0)), "is not after start"),
    (timeline(("joy", 0, 3600)), "the limit of 10 min (BGM_MUSIC_MAX_DURATION_S)"),
])
def test_bad_timelines_are_invalid_argument(music, spans, fragment):
    stub, running = music
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(music_pb2.GenerateRequest(spans=spans), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    assert health_status(channel(running.address), "bgm.v1.MusicGenerator") == "SERVING"


def test_a_backend_this_build_lacks_is_failed_precondition(music):
    stub, _ = music
    request = music_pb2.GenerateRequest(spans=timeline(("joy", 0, 5)), style=music_pb2.MusicStyle(backend="riffusion"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


class ToneBackend:
    """A backend added at run time: a steady tone per span, louder for later spans."""

    name = "tone"

    def __init__(self, context) -> None:
        self.context = context

    def generate(self, spans, *, sample_rate, seed, tempo, cancel=None, steps=None, guidance=None, strength=None):
        total = round(spans[-1][2] * sample_rate)
        t = np.arange(total) / sample_rate
        mono = 0.1 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
        return np.repeat(mono[:, None], 2, axis=1), tempo or 100.0


def test_adding_a_backend_is_one_class_and_one_registry_line(music):
    from services.music import backends

    stub, _ = music
    backends.register("tone", ToneBackend)
    try:
        request = music_pb2.GenerateRequest(spans=timeline(("joy", 0, 3), ("sadness", 3, 5)),
                                            style=music_pb2.MusicStyle(backend="tone"),
                                            format=common_pb2.AudioFormat(sample_rate_hz=RATE, channels=2))
        events = list(stub.Generate(request, timeout=30))
    finally:
        del backends.REGISTRY["tone"]
    header = events[0].header
    assert header.backend == "tone" and header.total_samples == 5 * RATE
    pcm = b"".join(e.chunk.pcm for e in events if e.WhichOneof("event") == "chunk")
    audio = np.frombuffer(pcm, dtype="<f4").reshape(-1, 2)
    assert audio.shape[0] == 5 * RATE and np.abs(audio).max() > 0.05  # the tone came through, levelled


def test_a_long_span_is_made_and_streamed_in_pieces_of_its_own(music, monkeypatch):
    from services.music import servicer as music_servicer

    assert music_servicer.piece_lengths(25 * RATE, RATE) == [25 * RATE]
    assert music_servicer.piece_lengths(241 * RATE, RATE) == [round(241 / 3 * RATE)] * 3  # equal, none tiny
    monkeypatch.setattr(music_servicer, "PIECE_S", 4.0)  # pieces of at most 4 s, as 120 s are made of hours
    stub, _ = music
    events = list(stub.Generate(music_pb2.GenerateRequest(spans=timeline(("joy", 0.0, 10.0))), timeout=120))
    chunks = [e.chunk for e in events[1:]]
    assert chunks[0].start_sample == 0 and all(c.span_index == 0 for c in chunks)
    assert sum(len(c.pcm) for c in chunks) // 8 == 10 * RATE
    assert all(b.start_sample == a.start_sample + len(a.pcm) // 8 for a, b in itertools.pairwise(chunks))
    pcm = np.frombuffer(b"".join(c.pcm for c in chunks), dtype="<f4").reshape(-1, 2)
    third = round(10 / 3 * RATE)
    pieces = [pcm[i * third: (i + 1) * third] for i in range(3)]
    assert all(np.sqrt(np.mean(p ** 2)) > 0.01 for p in pieces)  # every piece is heard
    assert not np.allclose(pieces[0], pieces[1], atol=1e-3)  # its own music, not a repeat


@pytest.mark.parametrize("emotion", list(STYLES))
def test_no_emotion_is_a_loop(composer, emotion):
    """At most half the bars of a 24 s render near-identical to the bar four bars earlier
    (bench.musicality); the measure itself calls a literal 4-bar loop a loop."""
    from bench.musicality import repeated_fraction

    rate = 22_050
    audio, tempo = composer.generate([(emotion, 0.0, 24.0)], sample_rate=rate, seed=2, tempo=None)
    mono, bar_s = audio.mean(axis=1), BEATS_PER_BAR * 60.0 / tempo
    share = repeated_fraction(mono, rate, bar_s)
    print(f"\n{emotion}: {share:.2f} of bars repeat the bar 4 earlier")
    assert share <= 0.5
    four_bars = mono[: round(4 * bar_s * rate)]
    assert repeated_fraction(np.tile(four_bars, 3), rate, bar_s) == 1.0


def test_a_span_has_an_intro_phrases_a_and_b_fills_and_an_ending():
    from services.music.composer import form

    roles = form(11)
    assert [r.section for r in roles] == ["intro", *"AAAA", *"BBBB", "A", "end"]
    assert [i for i, r in enumerate(roles) if r.fill] == [4, 8]  # into each next phrase
    assert [r.section for r in form(2)] == ["A", "end"] and [r.section for r in form(1)] == ["A"]


def test_joins_between_emotions_keep_the_loudness_and_do_not_click():
    """A 70 s joy -> sadness -> anger timeline as the service hands it out (bench.musicality)."""
    from bench.musicality import transitions

    for at, step, click in transitions():
        print(f"\njoin at {at} s: {step:+.1f} LU, jump {click:.2f}x the 99.9th percentile")
        assert abs(step) <= 4.0 and click <= 2.0
