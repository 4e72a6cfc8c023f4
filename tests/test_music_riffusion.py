"""The Riffusion path: the spectrogram codec on real music, and the whole backend through
gRPC on a tiny Stable Diffusion pipeline that the test builds and saves."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("diffusers")

from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, music_pb2, music_pb2_grpc
from services.music import spectrogram
from services.music.composer import plan
from services.music.riffusion import CLIP_SECONDS, hop_beats, plan_clips
from services.music.servicer import MusicServicer
from services.music.settings import MusicSettings
from tests.conftest import channel, start
from tests.test_music import timeline
from tests.tiny_models import tiny_stable_diffusion

RATE = 44_100


def test_spectrogram_round_trip_keeps_the_spectral_envelope_of_real_music():
    import immich_memories_music

    from bgm import media

    p = spectrogram.PARAMS
    assert (p.sample_rate, p.hop_length, p.win_length, p.n_fft, p.n_mels, p.f_max) == (
        44_100, 441, 4_410, 17_640, 512, 10_000)
    track = sorted(Path(immich_memories_music.__file__).parent.glob("tracks/happy/*.opus"))[0]
    audio = media.decode_audio(track, RATE, 1)[:, 0][10 * RATE : 10 * RATE + p.clip_samples]
    image, max_value = spectrogram.audio_to_image(audio)
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert image[:, :, 0].mean() > 128  # mostly light: Riffusion draws loud as dark
    back = spectrogram.image_to_audio(image, max_value)
    correlation = spectrogram.log_mel_correlation(audio, back)
    print(f"\nspectrogram round trip on {track.name}: log-mel correlation {correlation:.3f}")
    assert correlation >= 0.9


def test_the_torch_phase_recovery_a_gpu_runs_matches_librosas_on_real_music():
    """The Griffin-Lim that runs on the diffusion model's GPU, run here on the CPU (same
    code): as faithful as librosa's, as long, and the same for the same seed."""
    pytest.importorskip("torch")
    import immich_memories_music

    from bgm import media

    p = spectrogram.PARAMS
    track = sorted(Path(immich_memories_music.__file__).parent.glob("tracks/calm/*.opus"))[0]
    audio = media.decode_audio(track, RATE, 1)[:, 0][20 * RATE : 20 * RATE + p.clip_samples]
    image, max_value = spectrogram.audio_to_image(audio)
    linear = spectrogram.invert_mel(spectrogram.spectrogram_from_image(image, max_value))
    back = spectrogram.griffin_lim_torch(linear, seed=5)
    correlation = spectrogram.log_mel_correlation(audio, back)
    print(f"\ntorch Griffin-Lim on {track.name}: log-mel correlation {correlation:.3f}")
    assert correlation >= 0.9
    assert back.shape == ((p.width - 1) * p.hop_length,) and back.dtype == np.float32  # as librosa's
    assert np.array_equal(back, spectrogram.griffin_lim_torch(linear, seed=5))


def test_the_sparse_mel_inversion_gives_what_the_dense_updates_give():
    """invert_mel works on the filters' non-zeros only; the plain dense multiplicative
    updates over the whole basis must give the same magnitudes."""
    p = spectrogram.SpectrogramParams(hop_length=256, win_length=1024, n_fft=2048, n_mels=64, width=40)
    rng = np.random.default_rng(3)
    mel = spectrogram.mel_spectrogram(rng.standard_normal(40 * 256).astype(np.float32), p)
    basis = spectrogram._mel_basis(p).astype(np.float64)
    linear = (basis / np.maximum(basis.sum(axis=0), 1e-8)[None, :]).T @ mel
    norm = np.maximum(basis.T @ np.ones_like(mel), 1e-9)
    for _ in range(40):
        linear *= (basis.T @ (mel / np.maximum(basis @ linear, 1e-9))) / norm
    fast = spectrogram.invert_mel(mel, p)
    assert fast.shape == linear.shape == (p.n_fft // 2 + 1, mel.shape[1])
    assert np.abs(fast - linear).max() <= 1e-4 * linear.max()
    assert not fast[basis.sum(axis=0) == 0].any()  # above f_max: silent


def test_clips_start_on_beats_of_their_own_span_and_cover_the_timeline():
    spans = [("joy", 0.0, 7.0), ("sadness", 7.0, 12.0)]
    tempos = [120.0, 72.0]
    clips = plan_clips(spans, 0.5, tempos)
    assert clips[0].start_s == 0.0 and clips[-1].start_s + CLIP_SECONDS >= 12.0
    for index, (emotion, begin, end) in enumerate(spans):
        own = [c for c in clips if c.span == index]
        beat = 60.0 / tempos[index]
        assert own[0].start_s == begin and all(c.emotion == emotion and c.tempo == tempos[index] for c in own)
        for c in own:
            beats = (c.start_s - begin) / beat
            assert abs(beats - round(beats)) < 1e-9  # a whole number of the span's beats
        # The span's last clip runs past its end by the next span's crossfade (one beat).
        fade = 60.0 / tempos[index + 1] if index + 1 < len(spans) else 0.0
        assert own[-1].start_s + CLIP_SECONDS >= end + fade - 1e-9
    assert hop_beats(0.5, 0.5) == 9 and hop_beats(1.5, 0.5) == 2  # a slow beat still leaves one to fade over


@pytest.fixture(scope="module")
def riffusion(loop, tmp_path_factory):
    model = tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))
    settings = MusicSettings(backend="riffusion", riffusion_model=str(model), device="cpu", steps=4)
    running = start(loop, [MusicServicer(settings, ServerSettings())])
    yield music_pb2_grpc.MusicGeneratorStub(channel(running.address)), running
    loop.run(running.stop(0))


def test_tiny_riffusion_fills_a_12_s_timeline_exactly_without_clicks(riffusion):
    stub, _ = riffusion
    spans = timeline(("joy", 0.0, 7.0), ("sadness", 7.0, 12.0))
    events = list(stub.Generate(music_pb2.GenerateRequest(
        spans=spans, format=common_pb2.AudioFormat(sample_rate_hz=RATE, channels=2,
                                                   encoding=common_pb2.ENCODING_PCM_F32LE)), timeout=600))
    header = events[0].header
    assert header.backend == "riffusion" and header.total_samples == 12 * RATE
    chunks = [e.chunk for e in events[1:]]
    audio = np.frombuffer(b"".join(c.pcm for c in chunks), dtype="<f4").reshape(-1, 2)
    assert audio.shape == (12 * RATE, 2) and np.isfinite(audio).all() and np.abs(audio).max() > 0.1
    for c in chunks:
        expected = 0 if c.start_sample < 7 * RATE else 1
        assert c.span_index == expected and c.emotion == spans[expected].emotion

    # Each span at its own tempo, reported per span.
    assert len(header.span_tempos_bpm) == 2 and header.tempo_bpm == header.span_tempos_bpm[0]
    # Whole beats per span at its own tempo (no glide at the join: Riffusion's clips crossfade there).
    fitted = [plan([(emotion, 0.0, length)])[0].tempo for emotion, length in (("joy", 7.0), ("sadness", 5.0))]
    assert list(header.span_tempos_bpm) == pytest.approx(fitted, rel=1e-5)
    assert fitted[0] != fitted[1]  # two beats, not one score tempo

    # No clicks: the biggest sample-to-sample jump near a join is no bigger than elsewhere.
    mono = audio[:, 0]
    jumps = np.abs(np.diff(mono))
    clips = plan_clips([(s, a, b) for s, a, b in (("joy", 0.0, 7.0), ("sadness", 7.0, 12.0))], 0.5,
                       list(header.span_tempos_bpm))
    joins = []
    for k, clip in enumerate(clips[1:], start=1):
        start = round(clip.start_s * RATE)
        joins += [start, start + round(clip.beat_s * RATE)]  # where a crossfade begins and ends
        assert clips[k - 1].start_s + CLIP_SECONDS >= clip.start_s + clip.beat_s - 1e-9
    assert 7 * RATE in joins  # the change of emotion is a clip's first beat
    near = np.zeros_like(jumps, dtype=bool)
    for j in joins:
        if 0 < j < jumps.shape[0]:
            near[max(0, j - 88) : j + 88] = True
    print(f"\nlargest jump near joins {jumps[near].max():.4f}, elsewhere {jumps[~near].max():.4f}")
    assert jumps[near].max() <= jumps[~near].max()


@pytest.mark.parametrize(("style", "fragment"), [
    (music_pb2.MusicStyle(steps=0), "steps 0 is out of range"),
    (music_pb2.MusicStyle(denoising_strength=1.5), "denoising_strength 1.5 is out of range"),
    (music_pb2.MusicStyle(guidance=99), "guidance 99 is out of range"),
])
def test_bad_diffusion_options_are_invalid_argument(riffusion, style, fragment):
    stub, _ = riffusion
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(music_pb2.GenerateRequest(spans=timeline(("joy", 0, 5)), style=style), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_cancelling_a_riffusion_generation_stops_the_diffusion_and_frees_the_slot(riffusion):
    """The client goes away mid-generation: the UNet stops within a step or two (counted by a
    forward hook on the real model), the slot is free, and the next request is served."""
    stub, running = riffusion
    servicer = running.servicers[0]
    unet = servicer.backends["riffusion"].engine.pipe.unet
    steps = {"count": 0}
    hook = unet.register_forward_hook(lambda *_: steps.__setitem__("count", steps["count"] + 1))
    try:
        long = music_pb2.GenerateRequest(spans=timeline(("joy", 0.0, 300.0)),
                                         style=music_pb2.MusicStyle(steps=50))
        call = stub.Generate(long, timeout=600)
        consumer = threading.Thread(target=_drain, args=(call,))
        consumer.start()
        deadline = time.monotonic() + 120
        while steps["count"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert steps["count"] >= 3, "the diffusion never started"
        call.cancel()
        consumer.join(30)
        time.sleep(0.5)
        at_cancel = steps["count"]
        time.sleep(3.0)
        print(f"\nUNet calls before cancel settled: {at_cancel}, three seconds later: {steps['count']}")
        assert steps["count"] <= at_cancel + 1, "the diffusion kept running after the client went away"
        assert servicer.limiter.active == 0
    finally:
        hook.remove()
    again = list(stub.Generate(music_pb2.GenerateRequest(spans=timeline(("sadness", 0.0, 3.0))), timeout=600))
    assert again[0].header.total_samples == 3 * RATE


def _drain(call) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass
