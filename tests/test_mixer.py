"""The mixer with real files: DeepFilterNet separation, the mix's levels, the muxed picture,
and input that must be refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile

from bgm.audio import PCM_F32LE, PCM_S16LE, audio_format, float_to_pcm, pcm_to_float
from bgm.chunks import iter_chunks
from bgm.settings import ServerSettings
from bgm.v1 import mixer_pb2, mixer_pb2_grpc
from services.mixer import dsp, render, residue
from services.mixer.separation import DeepFilterNet
from services.mixer.servicer import MixerServicer
from services.mixer.settings import MixerSettings
from tests.conftest import bgm_temp_files, channel, health_status, speak, start
from tests.media_files import colour_video, decode, duration, ffmpeg, streams, video_packet_hashes

RATE = 48_000
TEXT = ("Good evening. Tonight we look at the history of the harbour. The first ships arrived two hundred "
        "years ago.", "Today the old warehouses are shops and cafes, and the fishermen sell their catch at dawn.")


@pytest.fixture(scope="module")
def mixer(loop):
    running = start(loop, [MixerServicer(MixerSettings(), ServerSettings())])
    yield mixer_pb2_grpc.MixerStub(channel(running.address)), running
    loop.run(running.stop(0))


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Clean speech with pauses, a music track of the same length, and their mix."""
    import immich_memories_music

    tmp = tmp_path_factory.mktemp("mix")
    first, second = (decode(speak(text, tmp / f"speech{i}.wav"))[:, 0] for i, text in enumerate(TEXT))
    # A 3 s pause in the middle: the music must come back up there.
    speech = np.concatenate([np.zeros(RATE), first, np.zeros(3 * RATE), second, np.zeros(2 * RATE)]).astype(np.float32)
    track = sorted(Path(immich_memories_music.__file__).parent.glob("tracks/energetic/*.opus"))[0]
    music = decode(track)[: speech.shape[0], 0]
    music = music / (np.sqrt((music**2).mean()) + 1e-9) * np.sqrt((speech**2).mean())  # 0 dB speech-to-music
    return tmp, speech, music.astype(np.float32)


def separate(stub, mono: np.ndarray, stems=(mixer_pb2.STEM_SPEECH,)) -> dict[int, np.ndarray]:
    def requests():
        yield mixer_pb2.SeparateRequest(config=mixer_pb2.SeparateConfig(format=audio_format(RATE, 1), stems=stems))
        for piece in iter_chunks(float_to_pcm(mono[:, None])):
            yield mixer_pb2.SeparateRequest(audio=piece)

    parts: dict[int, list[bytes]] = {}
    for event in stub.Separate(requests(), timeout=300):
        if event.WhichOneof("event") == "chunk":
            parts.setdefault(event.chunk.stem, []).append(event.chunk.data)
    return {stem: np.frombuffer(b"".join(p), dtype="<f4") for stem, p in parts.items()}


def srr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Speech-to-residual ratio in dB, after the best scaling of the estimate."""
    scale = float(reference @ estimate) / float(estimate @ estimate + 1e-12)
    residual = reference - scale * estimate
    return 10 * np.log10(float(reference @ reference) / float(residual @ residual + 1e-12))


def test_deepfilternet_recovers_speech_from_music(mixer, material):
    stub, _ = mixer
    _, speech, music = material
    mix = speech + music
    stems = separate(stub, mix, (mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_REST))
    recovered = stems[mixer_pb2.STEM_SPEECH]
    assert recovered.shape == mix.shape
    assert np.allclose(recovered + stems[mixer_pb2.STEM_REST], mix, atol=1e-5)
    before, after = srr(speech, mix), srr(speech, recovered)
    print(f"\nDeepFilterNet3: speech-to-residual {before:.1f} dB -> {after:.1f} dB (+{after - before:.1f} dB)")
    assert after - before >= 5.0


def mix_and_mux(stub, original: Path, speech: np.ndarray | None, bgm: np.ndarray | None,
                options: mixer_pb2.MixOptions | None = None, name: str | None = None, marked: bool = False):
    """One MixAndMux call; ``marked`` sends the original first and ends each track with ``last``."""
    config = mixer_pb2.MixConfig(options=options or mixer_pb2.MixOptions(), original_name=name or original.name)
    tracks = []
    if speech is not None:
        config.speech_format.CopyFrom(audio_format(RATE, 1))
        tracks.append((mixer_pb2.TRACK_SPEECH, float_to_pcm(speech[:, None])))
    if bgm is not None:
        config.bgm_format.CopyFrom(audio_format(RATE, 1))
        tracks.append((mixer_pb2.TRACK_BGM, float_to_pcm(bgm[:, None])))

    original_track = (mixer_pb2.TRACK_ORIGINAL, original.read_bytes())
    ordered = [original_track, *tracks] if marked else [*tracks, original_track]

    def requests():
        yield mixer_pb2.MixRequest(config=config)
        for track, data in ordered:
            for piece in iter_chunks(data):
                yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=track, data=piece))
            if marked:
                yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=track, last=True))

    result, media, stems = None, [], {}
    for event in stub.MixAndMux(requests(), timeout=300):
        kind = event.WhichOneof("event")
        if kind == "result":
            result = event.result
        elif kind == "media":
            media.append(event.media)
        elif kind == "stem":
            stems.setdefault(event.stem.stem, []).append(event.stem.data)
    return result, b"".join(media), {k: b"".join(v) for k, v in stems.items()}


def test_mix_levels_ducking_and_an_untouched_picture(mixer, material):
    stub, _ = mixer
    tmp, speech, music = material
    seconds = speech.shape[0] / RATE
    soundfile.write(tmp / "orig.wav", speech + music, RATE)
    original = colour_video(tmp / "clip.mp4", seconds, tmp / "orig.wav")
    # The path a user runs: the mixer gets the *separated* speech, old music residue and all.
    separated = separate(stub, speech + music)[mixer_pb2.STEM_SPEECH]
    options = mixer_pb2.MixOptions(return_stems=[mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_BGM, mixer_pb2.STEM_MIX])
    result, media, stems = mix_and_mux(stub, original, separated, music, options)
    out = tmp / "remixed.mp4"
    out.write_bytes(media)

    assert result.container == "mp4" and result.video_copied
    assert streams(out) == ["video:h264", "audio:aac"]
    assert video_packet_hashes(out) == video_packet_hashes(original)
    assert abs(duration(out) - duration(original)) <= 0.05

    # Levels of the final file (after AAC), measured independently of the mixer's own report.
    final = decode(out, RATE, 2)
    lufs = reference_loudness(final)
    peak = dsp.true_peak_db(final)
    print(f"\nmix: {lufs:.2f} LUFS (target -14), true peak {peak:.2f} dBTP (ceiling -1)")
    assert abs(lufs + 14.0) <= 1.0
    assert peak <= -1.0
    assert result.true_peak_dbtp == pytest.approx(peak, abs=0.05)
    assert result.loudness_lufs == pytest.approx(lufs, abs=0.05)

    # During speech the music sits at least 12 dB under the speech (from the returned stems).
    speech_stem = soundfile.read(_wav(tmp, stems[mixer_pb2.STEM_SPEECH]), dtype="float32")[0].mean(axis=1)
    bgm_stem = soundfile.read(_wav(tmp, stems[mixer_pb2.STEM_BGM]), dtype="float32")[0].mean(axis=1)
    n = min(speech_stem.shape[0], speech.shape[0])
    speech_stem, bgm_stem = speech_stem[:n], bgm_stem[:n]
    talking = talking_samples(speech[:n])
    gap_db = 10 * np.log10((speech_stem[talking] ** 2).mean() / (bgm_stem[talking] ** 2).mean())
    pause = np.zeros(n, dtype=bool)
    pause[int(first_end(speech) + 0.4 * RATE) : int(first_end(speech) + 2.6 * RATE)] = True  # the 3 s pause
    bed_db = 10 * np.log10((bgm_stem[pause] ** 2).mean() + 1e-12) - 10 * np.log10((bgm_stem[talking] ** 2).mean())
    # What the kept speech carries in the pause (the old music's residue) against the speech.
    residue_db = (10 * np.log10((speech_stem[pause] ** 2).mean() + 1e-20)
                  - 10 * np.log10((speech_stem[talking] ** 2).mean()))
    print(f"music under speech: {gap_db:.1f} dB below; {bed_db:.1f} dB louder in the pause; "
          f"kept speech in the pause {residue_db:.1f} dB")
    assert gap_db >= 12.0
    assert bed_db >= 6.0  # the music comes back up when nobody talks
    assert residue_db <= -35.0  # the old music does not survive in the pauses


def talking_samples(clean: np.ndarray) -> np.ndarray:
    """The test's own oracle on the clean speech: 10 ms frames within 30 dB of the loud ones."""
    frames = clean.shape[0] // 480
    level = 10 * np.log10((clean[: frames * 480].reshape(frames, 480) ** 2).mean(axis=1) + 1e-12)
    out = np.zeros(clean.shape[0], dtype=bool)
    out[: frames * 480] = np.repeat(level > np.percentile(level, 95) - 30.0, 480)
    return out


def first_end(clean: np.ndarray) -> int:
    """Where the first sentence ends: the start of the longest silent run (the 3 s pause)."""
    quiet = np.abs(clean) < 1e-4
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2]
    inner = [(e - s, s) for s, e in zip(starts, ends, strict=True) if s > 0 and e < clean.shape[0]]
    return max(inner)[1]


def _wav(tmp: Path, data: bytes) -> Path:
    path = tmp / f"stem-{len(data)}.wav"
    path.write_bytes(data)
    return path


def test_video_without_audio_gets_the_music_alone(mixer, material):
    stub, _ = mixer
    tmp, _, music = material
    original = colour_video(tmp / "silent.mp4", 4.0)
    _, media, _ = mix_and_mux(stub, original, None, music[: 4 * RATE])
    out = tmp / "silent-remixed.mp4"
    out.write_bytes(media)
    assert streams(out) == ["video:h264", "audio:aac"]
    assert video_packet_hashes(out) == video_packet_hashes(original)
    assert reference_loudness(decode(out, RATE, 2)) > -20


def test_audio_only_input_returns_audio(mixer, material):
    stub, _ = mixer
    tmp, speech, music = material
    soundfile.write(tmp / "voice.wav", speech, RATE)
    result, media, _ = mix_and_mux(stub, tmp / "voice.wav", speech, music)
    out = tmp / "voice-remixed.m4a"
    out.write_bytes(media)
    assert result.mime_type == "audio/mp4" and not result.video_copied
    assert streams(out) == ["audio:aac"]
    assert abs(duration(out) - speech.shape[0] / RATE) <= 0.05


def crafted_inputs(tmp: Path) -> dict[str, bytes]:
    secret = tmp / "secret.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", str(secret))
    return {
        "hls playlist naming a local file": (
            f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{secret}\n#EXT-X-ENDLIST\n").encode(),
        "concat list naming a local file": f"ffconcat version 1.0\nfile '{secret}'\n".encode(),
        "m3u with a file url": f"#EXTM3U\nfile://{secret}\n".encode(),
    }


@pytest.mark.parametrize("kind", ["hls playlist naming a local file", "concat list naming a local file",
                                  "m3u with a file url"])
def test_playlists_are_refused_and_nothing_is_read(mixer, tmp_path, kind):
    stub, running = mixer
    data = crafted_inputs(tmp_path)[kind]
    name = {"hls playlist naming a local file": "x.m3u8", "concat list naming a local file": "x.ffconcat"}.get(
        kind, "x.m3u")
    path = tmp_path / name
    path.write_bytes(data)
    secret = tmp_path / "secret.wav"
    before = secret.stat().st_atime_ns
    with pytest.raises(grpc.RpcError) as info:
        mix_and_mux(stub, path, None, np.zeros(RATE, dtype=np.float32))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a media file we can read" in info.value.details()
    assert secret.stat().st_atime_ns == before
    assert health_status(channel(running.address), "bgm.v1.Mixer") == "SERVING"


def test_bad_originals_get_clear_errors_and_leave_no_files(mixer, material):
    stub, running = mixer
    tmp, _, _ = material
    full = colour_video(tmp / "whole.mp4", 3.0)
    truncated = tmp / "truncated.mp4"
    truncated.write_bytes(full.read_bytes()[: 2000])
    empty = tmp / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp / "junk.mp4"
    junk.write_bytes(np.random.default_rng(1).bytes(50_000))
    before = bgm_temp_files()
    for path, fragment in ((truncated, "not a media file"), (empty, "no ORIGINAL track"), (junk, "not a media file")):
        with pytest.raises(grpc.RpcError) as info:
            mix_and_mux(stub, path, None, np.zeros(RATE, dtype=np.float32))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert fragment in info.value.details()
        assert health_status(channel(running.address), "bgm.v1.Mixer") == "SERVING"
    assert bgm_temp_files() <= before


def test_mix_options_out_of_range_are_refused(mixer, material):
    stub, _ = mixer
    tmp, _, _ = material
    original = colour_video(tmp / "opt.mp4", 1.0)
    with pytest.raises(grpc.RpcError) as info:
        mix_and_mux(stub, original, None, None, mixer_pb2.MixOptions(loudness_lufs=12))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loudness_lufs 12 is out of range [-60, 0]" in info.value.details()


def test_separate_answers_in_the_encoding_it_was_sent(mixer, material):
    """16-bit in, 16-bit back (what the gateway sends: half the bytes it keeps on disk), and
    the same speech as from floats to within 16-bit precision."""
    stub, _ = mixer
    _, speech, music = material
    mix = (speech + music)[: 4 * RATE] * 0.5

    def run(encoding: int) -> tuple[int, np.ndarray]:
        def requests():
            yield mixer_pb2.SeparateRequest(config=mixer_pb2.SeparateConfig(format=audio_format(RATE, 1, encoding)))
            for piece in iter_chunks(float_to_pcm(mix[:, None], encoding)):
                yield mixer_pb2.SeparateRequest(audio=piece)

        header, data = None, b""
        for event in stub.Separate(requests(), timeout=300):
            if event.WhichOneof("event") == "header":
                header = event.header
            elif event.WhichOneof("event") == "chunk":
                data += event.chunk.data
        assert header is not None
        return header.format.encoding, pcm_to_float(data, header.format)[:, 0]

    (f32, floats), (s16, shorts) = run(PCM_F32LE), run(PCM_S16LE)
    assert f32 == PCM_F32LE and s16 == PCM_S16LE and shorts.shape == floats.shape == (mix.shape[0],)
    error = 10 * np.log10(np.sum(floats**2) / np.sum((shorts - floats) ** 2))
    assert error > 40, f"16-bit speech differs from the float speech at {error:.1f} dB"


def test_separation_streams_speech_while_it_works(mixer, material):
    """Speech comes back in pieces between progress reports, not all at the end."""
    stub, _ = mixer
    _, speech, music = material
    mix = (speech + music)[: 8 * RATE]

    def requests():
        yield mixer_pb2.SeparateRequest(config=mixer_pb2.SeparateConfig(format=audio_format(RATE, 1)))
        for piece in iter_chunks(float_to_pcm(mix[:, None])):
            yield mixer_pb2.SeparateRequest(audio=piece)

    events, parts = [], []
    for event in stub.Separate(requests(), timeout=300):
        kind = event.WhichOneof("event")
        events.append((kind, event.progress.fraction if kind == "progress" else None))
        if kind == "chunk":
            parts.append(event.chunk.data)
    fractions = [f for kind, f in events if kind == "progress"]
    first_chunk = next(i for i, (kind, _) in enumerate(events) if kind == "chunk")
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(kind == "progress" and f < 1.0 for kind, f in events[first_chunk:])
    streamed = np.frombuffer(b"".join(parts), dtype="<f4")
    settings = MixerSettings()
    separated = DeepFilterNet(settings.attenuation_limit_db).speech_blocks(mix)
    whole = np.concatenate(list(residue.expand(mix, separated, settings.expansion)))
    assert np.array_equal(streamed, whole)


def test_tracks_marked_complete_give_the_same_file_and_nothing_may_follow_last(mixer, material):
    stub, _ = mixer
    tmp, speech, music = material
    seconds = 6.0
    soundfile.write(tmp / "short.wav", (speech + music)[: int(seconds * RATE)], RATE)
    original = colour_video(tmp / "short.mp4", seconds, tmp / "short.wav")
    part = slice(0, int(seconds * RATE))
    _, plain, _ = mix_and_mux(stub, original, speech[part], music[part])
    result, marked, _ = mix_and_mux(stub, original, speech[part], music[part], marked=True)
    assert result.video_copied and marked == plain

    def after_last():
        yield mixer_pb2.MixRequest(config=mixer_pb2.MixConfig(original_name="clip.mp4"))
        yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=mixer_pb2.TRACK_ORIGINAL,
                                                              data=original.read_bytes(), last=True))
        yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=mixer_pb2.TRACK_ORIGINAL, data=b"more"))

    with pytest.raises(grpc.RpcError) as info:
        list(stub.MixAndMux(after_last(), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "original chunk came after that track's last chunk" in info.value.details()


def reference_loudness(x: np.ndarray) -> float:
    """pyloudnorm's BS.1770 meter: an implementation independent of the mixer's own."""
    import pyloudnorm

    return float(pyloudnorm.Meter(RATE).integrated_loudness(x.astype(np.float64)))


def test_loudness_meter_matches_pyloudnorm_whole_and_in_pieces(material):
    _, speech, music = material
    rng = np.random.default_rng(7)
    cases = {
        "speech + music": np.stack([speech + music, speech + 0.5 * music], axis=1),
        "mono speech": speech[:, None],
        "quiet noise": (rng.standard_normal((3 * RATE, 2)) * 1e-3).astype(np.float32),
        "one block": music[: RATE // 2 + 17, None],
    }
    for name, x in cases.items():
        expected = reference_loudness(x)
        assert dsp.loudness(x) == pytest.approx(expected, abs=1e-3), name
        meter = dsp.LoudnessMeter(x.shape[1])
        cuts = np.sort(rng.integers(0, x.shape[0], 9))
        for piece in np.split(x, cuts):
            meter.feed(piece)
        assert meter.integrated() == pytest.approx(expected, abs=1e-3), name
    assert dsp.loudness(np.zeros((RATE, 2), dtype=np.float32)) == -120.0


def test_true_peak_matches_full_oversampling_and_the_limiter_holds_the_ceiling(material):
    from scipy.signal import resample_poly

    _, speech, music = material
    stereo = np.stack([music, 0.8 * music + 0.3 * speech], axis=1).astype(np.float32) * 3.0  # hot: clips
    full = 20 * np.log10(np.abs(resample_poly(stereo, 4, 1, axis=0)).max())
    assert dsp.true_peak_db(stereo) == pytest.approx(full, abs=0.05)
    limited = dsp.limit(stereo, -1.0)
    exact = 20 * np.log10(np.abs(resample_poly(limited, 4, 1, axis=0)).max())
    print(f"\ntrue peak before {full:.2f} dBTP, after the limiter {exact:.2f} dBTP")
    assert exact <= -1.0


@pytest.mark.parametrize(("target", "ceiling"), [(-14.0, -1.0), (-9.0, -1.0), (-23.0, -2.0)])
def test_levelling_estimates_the_loudness_it_gives_and_holds_the_ceiling(material, target, ceiling):
    """The levelling finds its make-up gain from one filtering pass (bgm.loudness.energy_steps)
    and one envelope; what it reports must be what the mix measures."""
    from scipy.signal import resample_poly

    _, speech, music = material
    stereo_speech = np.stack([speech, speech], axis=1)
    stereo_music = np.stack([music, 0.9 * music], axis=1).astype(np.float32)
    levels = dsp.MixLevels(duck_db=12, loudness_lufs=target, true_peak_dbtp=ceiling, fade_in_s=0.5,
                           fade_out_s=1.0, attack_ms=80, release_ms=400, bgm_gain_db=-6)
    outcome = render.mix(stereo_speech, stereo_music, levels)
    measured = dsp.loudness(outcome.mix)
    print(f"\ntarget {target}: reported {outcome.loudness_lufs:.3f}, measured {measured:.3f} LUFS")
    assert outcome.loudness_lufs == pytest.approx(measured, abs=1e-6)
    assert measured == pytest.approx(target, abs=0.3)
    exact = 20 * np.log10(np.abs(resample_poly(outcome.mix, 4, 1, axis=0)).max())
    assert exact <= ceiling - dsp.CODEC_HEADROOM_DB + 0.01
    assert np.allclose(outcome.speech + outcome.bgm, outcome.mix, atol=1e-5)  # the stems still add up


@pytest.mark.parametrize("kept", ["flac", "raw"])
def test_the_vad_that_follows_the_speech_as_it_arrives_gives_the_whole_tracks_verdict(material, tmp_path,
                                                                                     monkeypatch, kept):
    """MixAndMux runs the VAD on the speech while it is still arriving (``FollowingVad``):
    written in pieces that split samples, with the VAD told after each, it has run most of
    the track before the last piece lands, and what it gives once the track is complete is
    what one call on the whole track gives, window for window. The speech kept as FLAC
    segments (16-bit, what the gateway sends) is read while segments are still sealed."""
    import time

    from bgm import flac
    from services.mixer import activity, sources
    from services.mixer.following import FollowingVad

    _, speech, _ = material
    monkeypatch.setattr(activity, "VAD_RUN_WINDOWS", 50)  # runs of 1.6 s: several before the end
    whole = activity.speech_probability(speech)
    fmt = audio_format(dsp.SAMPLE_RATE, 1, PCM_S16LE)
    data = float_to_pcm(speech, PCM_S16LE)
    path = tmp_path / "speech.pcm"
    path.write_bytes(data)  # the whole track, for the verdict of one call
    n = speech.shape[0] + dsp.SAMPLE_RATE // 3  # the original runs a little longer than the speech
    store = flac.FlacSegments(tmp_path, "speech", fmt, segment_bytes=120_000)  # 1.25 s segments
    growing = tmp_path / "growing.pcm"
    if kept == "flac":
        following = FollowingVad(lambda _: sources.FlacTrack(store, n), n)
    else:
        following = FollowingVad(lambda written: sources.PcmFile(growing, fmt, n, written=written), n)
    with open(growing, "wb") as f:
        for start in range(0, len(data), 30_001):  # odd sizes: pieces end inside a sample
            piece = data[start : start + 30_001]
            if kept == "flac":
                store.write(piece)
                following.grew(store.size)
            else:
                f.write(piece)
                f.flush()
                following.grew(f.tell())
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while following.vad.lo < speech.shape[0] - following.vad.step48 * 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    ran_early = following.vad.done
    assert ran_early >= whole.shape[0] // 2  # it ran while the track arrived
    store.finish()
    track = sources.FlacTrack(store, n) if kept == "flac" else sources.PcmFile(growing, fmt, n)
    got = following.finish(track)
    expected = activity.speech_probability_of(sources.PcmFile(path, fmt, n))
    np.testing.assert_array_equal(got, expected)
    assert got.shape[0] >= whole.shape[0]
    following.thread.join(timeout=5)
    assert not following.thread.is_alive()
    if kept == "flac":
        assert len(store.segments) > 10
        store.close()
        assert not list(tmp_path.glob("speech.*.flac"))


def test_the_mix_made_in_blocks_is_the_mix_made_whole(material, monkeypatch):
    """The mixer never holds a whole programme: it reads its tracks, and renders, measures and
    encodes the mix, a block at a time, and makes the limiter's gain a chunk at a time.
    Blocks and chunks of a fraction of a second and of the whole clip must give the same
    mix, the same loudness and the same stems, and the VAD read in blocks the same verdict
    as on the whole track."""
    from services.mixer import activity, render, sources

    _, speech, music = material
    stereo_speech = np.stack([speech, speech], axis=1)
    stereo_music = np.stack([music, 0.9 * music], axis=1).astype(np.float32)
    levels = dsp.MixLevels(duck_db=12, loudness_lufs=-14, true_peak_dbtp=-1, fade_in_s=0.5,
                           fade_out_s=1.0, attack_ms=80, release_ms=400, bgm_gain_db=-6)
    whole_vad = activity.speech_probability(speech)
    monkeypatch.setattr(activity, "VAD_RUN_WINDOWS", 7)
    assert np.array_equal(activity.speech_probability_of(sources.ArraySource(speech)), whole_vad)
    talking = activity.detect(whole_vad, activity.threshold_for(levels.duck_sensitivity), speech.shape[0])
    bgm_lufs = dsp.loudness(stereo_music)

    def made(block: int, chunk_steps: int, hold_s: float = 0.0) -> tuple[render.MixOutcome, int, np.ndarray,
                                                                         np.ndarray]:
        monkeypatch.setattr(render, "BLOCK", block)
        monkeypatch.setattr(render, "CHUNK_STEPS", chunk_steps)
        monkeypatch.setattr(render, "HOLD_S", hold_s)  # 0: rendered anew for each pass, as a long programme is
        outcome = render.mix_measured(sources.ArraySource(stereo_speech), sources.ArraySource(stereo_music),
                                      levels, talking, bgm_lufs)
        return outcome, len(outcome.plan.ranges()), outcome.mix, outcome.speech + outcome.bgm

    whole, whole_blocks, whole_mix, _ = made(speech.shape[0] + 1, 10**9)
    # 0.37 s: whole frames and limiter steps; the limiter's gain made 1,800 steps (0.3 s) at a time
    small, small_blocks, small_mix, small_stems = made(17_760, 1800)
    assert whole_blocks == 1 and small_blocks > 30
    assert whole.gain.limiter is not None and small.gain.limiter is not None  # the limiter works here
    np.testing.assert_allclose(small_mix, whole_mix, atol=2e-5)
    assert small.loudness_lufs == pytest.approx(whole.loudness_lufs, abs=1e-3)
    assert small.true_peak_dbtp == pytest.approx(whole.true_peak_dbtp, abs=0.01)
    np.testing.assert_allclose(small_stems, small_mix, atol=1e-5)  # the stems add up
    # A short programme's mix rendered once and held gives the same mix.
    held, _, held_mix, _ = made(17_760, 1800, hold_s=60.0)
    assert held.plan.held is not None and small.plan.held is None
    np.testing.assert_allclose(held_mix, small_mix, atol=2e-5)
    assert held.loudness_lufs == pytest.approx(small.loudness_lufs, abs=1e-3)
    assert held.true_peak_dbtp == pytest.approx(small.true_peak_dbtp, abs=0.01)


def test_a_word_opens_only_what_the_vad_heard_of_it():
    """Whisper often stretches a word's timing over the pause after it; a noisy pause may
    make the VAD unsure for a window or two. The word must not hold the duck and the gate
    through the pause, but a word the VAD only half heard (a whisper) still opens, whole."""
    from services.mixer import activity

    windows_per_s = activity.VAD_RATE / activity.WINDOW
    probability = np.zeros(round(6 * windows_per_s), dtype=np.float32)

    def between(a: float, b: float) -> slice:
        return slice(round(a * windows_per_s), round(b * windows_per_s))

    probability[between(1.0, 1.5)] = 0.9  # said, and heard
    probability[between(3.2, 3.25)] = 0.2  # a cough in the pause: unsure for a window
    probability[between(4.0, 4.6)] = 0.3  # a whisper the VAD only half heard ...
    probability[between(4.25, 4.32)] = 0.05  # ... with a stop consonant in it
    frames = round(6 / activity.FRAME_S)
    active = np.zeros(frames, dtype=bool)

    def on(a: float, b: float, marks: np.ndarray) -> float:
        return float(marks[round(a / activity.FRAME_S) : round(b / activity.FRAME_S)].mean())

    marked = activity.add_words(active, [(1.0, 3.4), (4.0, 4.6), (5.2, 5.8)], probability)
    assert on(1.0, 1.5, marked) == 1.0  # the word itself
    assert on(1.7, 3.05, marked) == 0.0  # the pause it was stretched over ...
    assert on(3.2, 3.25, marked) == 1.0 and on(1.5, 3.4, marked) < 0.25  # ... but for the cough's moment
    assert on(4.0, 4.6, marked) == 1.0  # the whisper whole, its dip filled
    assert on(5.2, 5.8, marked) == 0.0  # a word made up over the music: nothing heard


def test_the_speech_loudness_measured_early_is_used_only_for_the_activity_it_was_measured_for(material):
    """The mixer measures the gated speech's loudness while the music is still on its way
    (tracks.TrackSet); the plan takes it only if the speech activity is the one it mixes with,
    and it is what the plan would have measured itself."""
    from services.mixer import activity, render, sources

    _, speech, music = material
    speech_source = sources.ArraySource(np.stack([speech, speech], axis=1))
    music_source = sources.ArraySource(np.stack([music, music], axis=1).astype(np.float32))
    levels = dsp.MixLevels(duck_db=12, loudness_lufs=-14, true_peak_dbtp=-1, fade_in_s=0.5,
                           fade_out_s=1.0, attack_ms=80, release_ms=400, bgm_gain_db=-6)
    probability = activity.speech_probability(speech)
    talking = activity.talking(probability, 0.5, speech.shape[0], [])
    with_word = activity.talking(probability, 0.5, speech.shape[0], [(0.0, 2.0)])
    assert not np.array_equal(talking, with_word)
    measured = render.plan(speech_source, music_source, levels, talking, -20.0)
    early = render.voice_loudness(speech_source, talking)
    assert early.lufs is not None
    assert render.plan(speech_source, music_source, levels, talking, -20.0, early).bed_gain == measured.bed_gain
    off = render.VoiceLoudness(talking, early.lufs - 6.0)  # the same activity, another loudness: taken
    taken = render.plan(speech_source, music_source, levels, talking, -20.0, off).bed_gain
    assert taken == pytest.approx(measured.bed_gain * 10 ** (-6 / 20), rel=1e-5)
    stale = render.VoiceLoudness(with_word, early.lufs - 6.0)  # measured before a word came: measured again
    assert render.plan(speech_source, music_source, levels, talking, -20.0, stale).bed_gain == measured.bed_gain
