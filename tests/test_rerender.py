"""The creator stays in control (#19): an edited timeline re-renders only what changed,
locked spans keep their music, malformed timelines are refused before any work, a project
folder makes the second run cheap, and the plot is readable."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile

from bgm import cache, vocab
from bgm.chunks import iter_file_chunks
from bgm.media import decode_audio
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, mixer_pb2, music_pb2, music_pb2_grpc
from gateway import timeline
from gateway.example import make_example
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from services.embedded import EmbeddedServices
from services.music import styles
from services.music.servicer import MusicServicer
from services.music.settings import MusicSettings
from tests.conftest import channel, start

RATE = vocab.SEPARATION_RATE
EDGES = (0.0, 8.0, 16.0, 24.0)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_example(tmp_path_factory.mktemp("rerender") / "clip.mp4", section_s=8.0)


@pytest.fixture(scope="module")
def gateway(loop):
    running = start(loop, [GatewayServicer(GatewaySettings(), ServerSettings(), EmbeddedServices())])
    yield gateway_pb2_grpc.GatewayStub(channel(running.address))
    loop.run(running.stop(1))


def spans(*emotions: str, seeds: list[int] | None = None) -> list[common_pb2.EmotionSpan]:
    made = []
    for i, name in enumerate(emotions):
        span = common_pb2.EmotionSpan(emotion=vocab.emotion_enum(name),
                                      span=common_pb2.TimeSpan(start_s=EDGES[i], end_s=EDGES[i + 1]))
        if seeds is not None:
            span.control.seed = seeds[i]
        made.append(span)
    return made


def remix(stub, video: Path, edited: list[common_pb2.EmotionSpan], seed: int | None = None
          ) -> tuple[np.ndarray, list[int], list[str]]:
    """The music the remix used (MUSIC stem), each span's seed, and the events seen."""
    options = gateway_pb2.RemixOptions(filename=video.name)
    options.timeline.spans.extend(edited)
    options.mix.return_stems.append(mixer_pb2.STEM_MUSIC)
    if seed is not None:
        options.music.seed = seed

    def requests():
        yield gateway_pb2.RemixRequest(options=options)
        for piece in iter_file_chunks(video):
            yield gateway_pb2.RemixRequest(video=piece)

    music, seeds, kinds = io.BytesIO(), [], []
    for event in stub.Remix(requests(), timeout=600):
        kind = event.WhichOneof("event")
        kinds.append(kind)
        if kind == "score":
            seeds = list(event.score.span_seeds)
        elif kind == "stem" and event.stem.stem == mixer_pb2.STEM_MUSIC:
            music.write(event.stem.data)
    music.seek(0)
    samples, rate = soundfile.read(music, dtype="float32")
    assert rate == RATE
    return samples, seeds, kinds


def part(music: np.ndarray, index: int) -> np.ndarray:
    return music[round(EDGES[index] * RATE): round(EDGES[index + 1] * RATE)]


def test_one_changed_span_leaves_the_others_music_sample_identical(gateway, video):
    first, seeds, kinds = remix(gateway, video, spans(vocab.JOY, vocab.SADNESS, vocab.ANGER))
    assert "transcript" in kinds and "timeline" in kinds and len(seeds) == 3
    assert first.shape[0] == round(24.0 * RATE)
    second, again, _ = remix(gateway, video, spans(vocab.JOY, vocab.FEAR, vocab.ANGER, seeds=seeds))
    assert again == seeds
    assert np.array_equal(part(first, 0), part(second, 0))
    assert np.array_equal(part(first, 2), part(second, 2))
    assert not np.allclose(part(first, 1), part(second, 1), atol=1e-3)


def test_a_locked_span_keeps_its_music_under_a_new_seed(gateway, video):
    first, seeds, _ = remix(gateway, video, spans(vocab.JOY, vocab.SADNESS, vocab.ANGER))
    # What the CLI sends for --seed 99 with span 0 locked: only the locked span keeps its seed.
    doc = {"version": 1, "duration_s": 24.0, "spans": [
        {"emotion": e, "start_s": EDGES[i], "end_s": EDGES[i + 1], "seed": seeds[i], "lock": i == 0}
        for i, e in enumerate((vocab.JOY, vocab.SADNESS, vocab.ANGER))]}
    edited = timeline.from_json(json.dumps(doc), new_seed=True)
    assert edited.spans[0].control.seed == seeds[0]
    assert not edited.spans[1].control.HasField("seed")
    second, new_seeds, _ = remix(gateway, video, list(edited.spans), seed=99)
    assert new_seeds[0] == seeds[0] and new_seeds[1] != seeds[1]
    assert np.array_equal(part(first, 0), part(second, 0))
    for i in (1, 2):
        assert not np.allclose(part(first, i), part(second, i), atol=1e-3)


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d["spans"][1].update(start_s=7.5), "spans[1].start_s is 7.5 s but spans[0] ends at 8 s (an overlap)"),
    (lambda d: d["spans"][1].update(start_s=8.5), "(a hole)"),
    (lambda d: d["spans"][2].update(emotion="happy"), 'spans[2].emotion "happy" is unknown'),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.pop("version"), "version is missing"),
    (lambda d: d["spans"][0].update(end_s="eight"), 'spans[0].end_s must be a number, not "eight"'),
    (lambda d: d["spans"][0].update(start_s=1.0), "spans[0].start_s is 1 s: the first span starts at 0"),
    (lambda d: d["spans"][1].update(lock=True), "spans[1].lock needs the span's seed"),
    (lambda d: d["spans"][1].update(style="polka"), "spans[1].style 'polka' is unknown"),
    (lambda d: d["spans"][1].update(intensity=1.5), "spans[1].intensity 1.5 is out of range [0, 1]"),
    (lambda d: d["spans"][1].update(tempo=90), "spans[1]: unknown field 'tempo'"),
    (lambda d: d["spans"][1].update(end_s=7.0), "spans[1].end_s 7 s is not after its start_s 8 s"),
    (lambda d: d.update(spans=[]), "the timeline has no spans"),
])
def test_malformed_timelines_name_the_field_and_span(edit, fragment):
    doc = {"version": 1, "duration_s": 24.0, "spans": [
        {"emotion": e, "start_s": EDGES[i], "end_s": EDGES[i + 1]} for i, e in enumerate(("joy", "sadness", "anger"))]}
    edit(doc)
    with pytest.raises(timeline.TimelineError) as refused:
        timeline.from_json(json.dumps(doc))
    assert fragment in str(refused.value)


def test_not_json_is_refused_with_its_position():
    with pytest.raises(timeline.TimelineError, match=r"not valid JSON: .* line 1"):
        timeline.from_json("{spans: [}")


@pytest.mark.parametrize("end, kind", [(30.0, "beyond the end of"), (20.0, "before the end of")])
def test_a_timeline_that_does_not_fit_the_video_is_refused_before_any_work(gateway, video, end, kind):
    edited = spans(vocab.JOY, vocab.SADNESS, vocab.ANGER)
    edited[2].span.end_s = end
    options = gateway_pb2.RemixOptions(filename=video.name)
    options.timeline.spans.extend(edited)

    def requests():
        yield gateway_pb2.RemixRequest(options=options)
        for piece in iter_file_chunks(video):
            yield gateway_pb2.RemixRequest(video=piece)

    stages = []
    with pytest.raises(grpc.RpcError) as refused:
        for event in gateway.Remix(requests(), timeout=120):
            if event.WhichOneof("event") == "progress":
                stages.append(event.progress.stage)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"spans[2].end_s is {end:g} s, {kind} the video (24.000 s)" in refused.value.details()
    # No stage past the audio's extraction started: no separation, no music, no mix.
    assert set(stages) <= {common_pb2.STAGE_UPLOAD, common_pb2.STAGE_EXTRACT_AUDIO}


def test_structurally_bad_timelines_are_refused_before_the_upload(gateway, video):
    options = gateway_pb2.RemixOptions(filename=video.name)
    options.timeline.spans.extend(spans(vocab.JOY, vocab.SADNESS))
    options.timeline.spans[1].span.start_s = 9.0

    def requests():  # options only: a refusal must come before any video is asked for
        yield gateway_pb2.RemixRequest(options=options)

    with pytest.raises(grpc.RpcError) as refused:
        list(gateway.Remix(requests(), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "(a hole)" in refused.value.details()


# ----- the music service's span controls and cache -----------------------------------------
@pytest.fixture(scope="module")
def music(loop):
    running = start(loop, [MusicServicer(MusicSettings(backend=vocab.MUSIC_COMPOSER), ServerSettings())])
    yield music_pb2_grpc.MusicGeneratorStub(channel(running.address))
    loop.run(running.stop(1))


def generate(stub, control: common_pb2.SpanControl | None = None,
             style: music_pb2.MusicStyle | None = None) -> np.ndarray:
    span = common_pb2.EmotionSpan(emotion=common_pb2.EMOTION_JOY, span=common_pb2.TimeSpan(start_s=0, end_s=8))
    if control is not None:
        span.control.CopyFrom(control)
    request = music_pb2.GenerateRequest(spans=[span], style=style, format=common_pb2.AudioFormat(
        sample_rate_hz=RATE, channels=2, encoding=common_pb2.ENCODING_PCM_F32LE))
    pcm = b"".join(e.chunk.pcm for e in stub.Generate(request, timeout=120) if e.WhichOneof("event") == "chunk")
    return np.frombuffer(pcm, dtype="<f4").reshape(-1, 2)


def test_style_and_intensity_change_the_music(music):
    from bgm.loudness import loudness

    plain = generate(music)
    strings = generate(music, common_pb2.SpanControl(style="strings"))
    quiet = generate(music, common_pb2.SpanControl(intensity=0.0))
    loud = generate(music, common_pb2.SpanControl(intensity=1.0))
    assert not np.allclose(plain, strings, atol=1e-3)
    # Intensity moves the level (±6 LU at the ends) as well as what is played.
    assert loudness(loud, RATE) - loudness(quiet, RATE) > 8.0
    assert set(styles.VARIANTS) == set(vocab.MUSIC_STYLES)


def test_a_whole_video_style_and_intensity_play_in_every_span_without_its_own(music):
    whole = music_pb2.MusicStyle(style="lo-fi", intensity=0.3)
    assert np.array_equal(generate(music, style=whole),
                          generate(music, common_pb2.SpanControl(style="lo-fi", intensity=0.3)))
    own = common_pb2.SpanControl(style="strings", intensity=0.9)
    assert np.array_equal(generate(music, own, style=whole), generate(music, own))  # the span's own wins
    renders = {name: generate(music, style=music_pb2.MusicStyle(style=name))
               for name in ("", "cinematic", "acoustic", "electronic", "lo-fi", "orchestral")}
    names = list(renders)
    for i, a in enumerate(names):
        assert np.abs(renders[a]).max() > 0.05, a
        for b in names[i + 1:]:
            assert not np.allclose(renders[a], renders[b], atol=1e-3), (a, b)
    with pytest.raises(grpc.RpcError) as refused:
        generate(music, style=music_pb2.MusicStyle(style="polka"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown style 'polka'; use piano, strings" in refused.value.details()


@pytest.mark.parametrize("control, fragment", [
    (common_pb2.SpanControl(style="polka"), "span 0: unknown style 'polka'"),
    (common_pb2.SpanControl(intensity=2.0), "span 0: intensity 2 is out of range"),
])
def test_bad_span_controls_are_invalid_argument(music, control, fragment):
    with pytest.raises(grpc.RpcError) as refused:
        generate(music, control)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in refused.value.details()


def test_array_cache_keeps_by_content_and_evicts_the_least_recently_used(tmp_path):
    store = cache.ArrayCache(str(tmp_path), memory_bytes=0, disk_bytes=3 * 8000 + 500)
    arrays = {f"k{i}": np.full(2000, i, dtype=np.float32) for i in range(4)}
    for name, array in arrays.items():
        store.put(name, array)
    assert store.get("k0") is None  # the oldest went when the fourth arrived
    assert np.array_equal(store.get("k3"), arrays["k3"])
    (tmp_path / "k3.npy").write_bytes(b"not an array")
    assert cache.ArrayCache(str(tmp_path), memory_bytes=0).get("k3") is None  # a damaged file is a miss
    assert not list(tmp_path.glob("*.partial"))
    assert cache.key("a", np.zeros(3)) != cache.key("a", np.zeros(4))


# ----- the CLI: project folder, --timeline-in, bgm clean -----------------------------------
def bgm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_project_rerender_and_clean(video, tmp_path):
    project = tmp_path / "project"
    first = bgm("remix", str(video), "-o", str(tmp_path / "one.mp4"), "--project", str(project),
                "--stems", str(tmp_path / "one"), "--style", "lo-fi", "--intensity", "0.8", "-q")
    assert first.returncode == 0, first.stderr
    saved = project / "timeline.json"
    doc = json.loads(saved.read_text())
    assert doc["version"] == 1 and all("seed" in s for s in doc["spans"]) and doc["music"]["backend"]
    # The whole video's style is recorded per span, so the re-render below (without --style)
    # keeps it: otherwise every span's music would change.
    assert all(s["style"] == "lo-fi" and s["intensity"] == 0.8 for s in doc["spans"])
    assert list((project / "cache" / "speech").glob("*.raw")) and list((project / "cache" / "music").glob("*.npy"))
    # The upload's audio for transcription (what Separate is sent is decoded as it is sent).
    assert len(list((project / "cache" / "audio").glob("*.raw"))) == 1
    changed = len(doc["spans"]) // 2
    doc["spans"][changed]["emotion"] = vocab.FEAR if doc["spans"][changed]["emotion"] != vocab.FEAR else vocab.JOY
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    rendered = len(list((project / "cache" / "music").glob("*.npy")))

    second = bgm("remix", str(video), "-o", str(tmp_path / "two.mp4"), "--project", str(project),
                 "--timeline-in", str(tmp_path / "edited.json"), "--stems", str(tmp_path / "two"), "-q")
    assert second.returncode == 0, second.stderr
    # Only the changed span was rendered again; the upload's audio was found in the cache.
    assert len(list((project / "cache" / "audio").glob("*.raw"))) == 1
    assert len(list((project / "cache" / "music").glob("*.npy"))) == rendered + 1
    one, _ = soundfile.read(tmp_path / "one" / "music.wav", dtype="float32")
    two, _ = soundfile.read(tmp_path / "two" / "music.wav", dtype="float32")
    for i, span in enumerate(doc["spans"]):
        a, b = round(span["start_s"] * RATE), round(span["end_s"] * RATE)
        assert np.array_equal(one[a:b], two[a:b]) == (i != changed), i
    assert json.loads(saved.read_text())["spans"][changed]["emotion"] == doc["spans"][changed]["emotion"]
    # The mix too: away from the edited span (1.5 s: the units re-encoded around it), the
    # remixed file decodes to the first run's samples (the mixer kept its last mix).
    first_mix, second_mix = (decode_audio(tmp_path / name, RATE, 2) for name in ("one.mp4", "two.mp4"))
    n = min(first_mix.shape[0], second_mix.shape[0])
    away = np.ones(n, dtype=bool)
    span = doc["spans"][changed]
    away[max(0, round((span["start_s"] - 1.5) * RATE)) : round((span["end_s"] + 1.5) * RATE)] = False
    assert away.mean() > 0.2 and np.array_equal(first_mix[:n][away], second_mix[:n][away])

    doc["spans"][0]["emotion"] = "happy"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    refused = bgm("remix", str(video), "-o", str(tmp_path / "three.mp4"), "--timeline-in", str(tmp_path / "bad.json"))
    assert refused.returncode == 3 and 'spans[0].emotion "happy" is unknown' in refused.stderr
    assert not (tmp_path / "three.mp4").exists()

    (project / "notes.txt").write_text("mine")
    kept = bgm("clean", str(project))
    assert kept.returncode == 0 and "notes.txt" in kept.stderr
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
    (project / "notes.txt").unlink()
    assert bgm("clean", str(project)).returncode == 2  # no longer a project: nothing removed
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    assert bgm("clean", str(other)).returncode == 2 and (other / "a.txt").exists()


def test_the_uploads_audio_is_decoded_once_per_content(video, tmp_path, monkeypatch):
    from bgm import media
    from bgm.client import RetryPolicy
    from gateway.pipeline import Remix

    def job(path: Path, max_duration_s: float = 3600.0, work: Path = tmp_path) -> Remix:
        return Remix(None, gateway_pb2.RemixOptions(), path, work, None, 60.0, RetryPolicy(),  # type: ignore[arg-type]
                     max_duration_s, cache.ArrayCache(str(tmp_path / "audio"), memory_bytes=0))

    work = tmp_path / "one"
    work.mkdir()
    first = job(video, work=work).decoded_audio("LIMIT")
    assert abs(first.samples / RATE - 24.0) < 0.1
    assert first.speech_to_text.stat().st_size * 3 == 2 * first.samples  # 16 kHz 16-bit; samples at 48 kHz
    heard = np.fromfile(first.speech_to_text, dtype="<i2")
    assert np.abs(heard).max() > 1000  # the audio itself, not silence
    # What Separate is sent is decoded as it is sent: the same length at 48 kHz, nothing on disk.
    separation = b"".join(first.separation_pcm(3600.0, "LIMIT"))
    assert abs(len(separation) - 2 * first.samples) <= 2 * 48 and np.abs(np.frombuffer(separation, "<i2")).max() > 1000
    assert sorted(p.name for p in work.iterdir()) == ["upload-stt.s16"]

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(media, "decode_audio_to_files", no_decode)
    again = job(video).decoded_audio("LIMIT")  # same content: from the cache, into this job's folder
    assert again.speech_to_text.parent == tmp_path and again.samples == first.samples
    assert again.speech_to_text.read_bytes() == first.speech_to_text.read_bytes()
    other = tmp_path / "other.mp4"
    other.write_bytes(video.read_bytes() + b"\0")  # other content (trailing byte): decoded anew
    with pytest.raises(AssertionError, match="decoded again"):
        job(other).decoded_audio("LIMIT")
    with pytest.raises(AssertionError, match="decoded again"):  # a stricter limit is not bypassed
        job(video, max_duration_s=10.0).decoded_audio("LIMIT")
