"""Teaching Riffusion the moods: the dataset builder on a click track and on the shipped
mood-tagged tracks, and LoRA training on a tiny Stable Diffusion pipeline the test builds
(real diffusers and peft code, random weights) whose adapter the music service then loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from bgm import media, vocab
from bgm.errors import Unsupported
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, music_pb2, music_pb2_grpc
from services.music import dataset, lora, spectrogram
from services.music.servicer import MusicServicer
from services.music.settings import MusicSettings
from services.music.train import TrainConfig, checkpoints, train
from tests.conftest import channel, start
from tests.test_music import timeline
from tests.tiny_models import tiny_stable_diffusion

RATE = spectrogram.PARAMS.sample_rate


def click_track(path: Path, bpm: float = 120.0, offset_s: float = 0.25, seconds: float = 30.0) -> list[float]:
    """Short decaying 1 kHz blips on every beat; returns the beat times."""
    audio = np.zeros(int(seconds * RATE), dtype=np.float32)
    blip = np.sin(2 * np.pi * 1000 * np.arange(int(0.03 * RATE)) / RATE) * np.exp(-np.arange(int(0.03 * RATE)) / 300)
    beats = list(np.arange(offset_s, seconds - 0.05, 60.0 / bpm))
    for beat in beats:
        start = round(beat * RATE)
        audio[start : start + blip.shape[0]] += 0.8 * blip.astype(np.float32)
    soundfile.write(path, audio, RATE)
    return [float(b) for b in beats]


def shipped(mood: str, name: str) -> Path:
    import immich_memories_music

    return Path(immich_memories_music.__file__).parent / "tracks" / mood / name


def test_clips_are_cut_on_the_beats_of_a_click_track(tmp_path):
    beats = click_track(tmp_path / "clicks.wav")
    (tmp_path / "tags.json").write_text(json.dumps([{"file": "clicks.wav", "emotion": vocab.SURPRISE,
                                                     "licence": "CC0-1.0", "instruments": "click"}]))
    summary = dataset.build([str(tmp_path / "clicks.wav")], tmp_path / "out", log=False)
    rows = dataset.read_metadata(tmp_path / "out")
    # Back to back from the first beat: 0.25, then the first beat after each clip's 5.12 s.
    assert [r["start_s"] for r in rows] == pytest.approx([0.25, 5.75, 11.25, 16.75, 22.25], abs=0.015)
    for row in rows:
        assert min(abs(row["start_s"] - b) for b in beats) < 0.015
        inside = np.array(row["beats"])
        assert len(inside) == 11 and np.allclose(np.diff(inside), 0.5, atol=0.015)
        assert row["text"] == "surprise music, click, 120 bpm" + (f", {row['key']}" if row["key"] else "")
    assert summary["clips_per_emotion"] == {e: (5 if e == vocab.SURPRISE else 0) for e in vocab.EMOTIONS}


def test_untagged_or_unlicensed_music_is_refused_before_anything_is_written(tmp_path):
    click_track(tmp_path / "a.wav", seconds=6)
    click_track(tmp_path / "b.wav", seconds=6)
    (tmp_path / "b.wav.json").write_text(json.dumps({"mood": "happy", "licence": "All rights reserved"}))
    with pytest.raises(dataset.DatasetError) as refused:
        dataset.build([str(tmp_path)], tmp_path / "out", log=False)
    message = str(refused.value)
    assert "a.wav: untagged" in message and "b.wav: no licence that allows training" in message
    assert not (tmp_path / "out").exists()
    assert dataset.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "out")]) == 2
    (tmp_path / "a.wav.json").write_text(json.dumps({"mood": "bouncy", "licence": "CC-BY-4.0"}))
    with pytest.raises(dataset.DatasetError, match="mood 'bouncy' maps to no emotion"):
        dataset.build([str(tmp_path / "a.wav")], tmp_path / "out", log=False)


@pytest.fixture(scope="module")
def moods(tmp_path_factory):
    """A dataset from two of the shipped mood-tagged tracks, through the command line."""
    out = tmp_path_factory.mktemp("moods")
    sources = [str(shipped("happy", "happy_acoustic_1.opus")), str(shipped("nostalgic", "nostalgic_acoustic_1.opus"))]
    assert dataset.main([*sources, "-o", str(out), "--max-clips-per-track", "4"]) == 0
    return out


def test_the_shipped_tracks_become_captioned_clips_that_decode_back_to_their_music(moods, capsys):
    summary = json.loads((moods / "dataset.json").read_text())
    assert summary["clips_per_emotion"][vocab.JOY] == 4 and summary["clips_per_emotion"][vocab.SADNESS] == 4
    assert summary["licences"] == ["MIT (immich-memories-music 0.1.0)"]
    rows = dataset.read_metadata(moods)
    texts = {r["text"] for r in rows}
    assert texts == {"joy music, happy mood, acoustic, 110 bpm, E major",
                     "sadness music, nostalgic mood, acoustic, 78 bpm, F minor"}
    from PIL import Image

    for row in (rows[1], rows[-1]):
        image = np.asarray(Image.open(row["path"]))
        assert image.shape == (512, 512, 3) and image.dtype == np.uint8
        track = shipped(row["mood"], row["file_name"].split("-", 1)[1].rsplit("-", 1)[0] + ".opus")
        audio = media.decode_audio(track, RATE, 1)[:, 0]
        start = round(row["start_s"] * RATE)
        original = audio[start : start + spectrogram.PARAMS.clip_samples]
        back = spectrogram.image_to_audio(image, row["max_value"])
        correlation = spectrogram.log_mel_correlation(original, back)
        print(f"\n{row['file_name']}: log-mel correlation {correlation:.3f}")
        assert correlation >= 0.9


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


def config(moods: Path, base: Path, out: Path, **changes) -> TrainConfig:
    settings = {"learning_rate": 1e-2, "steps": 12, "batch_size": 2, "checkpoint_every": 0, "validation": False,
                "progress": False, "device": "cpu", "seed": 7, "keep_checkpoints": 0} | changes
    return TrainConfig(moods, str(base), out, **settings)


@pytest.fixture(scope="module")
def trained(moods, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    return train(config(moods, base, out, validation=True, validation_steps=3))


def test_training_lowers_the_loss_and_saves_a_diffusers_lora_with_renders(trained):
    # The loss on one fixed draw (same clips, noise, timesteps) before and after 12 steps,
    # and the training loss of the last steps against the first ones (seed fixed).
    print(f"\nevaluation loss {trained.eval_loss_start:.4f} -> {trained.eval_loss_end:.4f}; "
          f"training loss {np.mean(trained.losses[:4]):.4f} -> {np.mean(trained.losses[-4:]):.4f}")
    assert trained.eval_loss_end < 0.97 * trained.eval_loss_start
    assert np.mean(trained.losses[-4:]) < np.mean(trained.losses[:4])
    adapter = trained.adapter
    from safetensors.torch import load_file

    weights = load_file(str(adapter / lora.WEIGHTS))
    assert weights and all(k.startswith("unet.") and ".lora" in k for k in weights)
    info = lora.read_info(adapter)
    assert info.rank == 4 and info.steps == 12 and set(info.vocabulary) == {vocab.JOY, vocab.SADNESS}
    assert info.prompt(vocab.JOY, 96) == "joy music, happy mood, acoustic, 96 bpm, C major"
    assert info.prompt(vocab.FEAR) == lora.PROMPTS[vocab.FEAR]  # never trained: the base prompt
    final = checkpoints(adapter)[-1]
    assert final.name == "step-000012"
    for emotion in (vocab.JOY, vocab.SADNESS):
        audio, rate = soundfile.read(final / f"{emotion}.wav")
        assert rate == RATE and audio.shape[0] > 4 * RATE and np.abs(audio).max() > 0.1


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(trained, moods, base, tmp_path):
    first = train(config(moods, base, tmp_path / "resumed", steps=6))
    assert [p.name for p in first.checkpoints] == ["step-000006"]
    second = train(config(moods, base, tmp_path / "resumed", resume="latest"))
    assert second.losses[:6] == first.losses and len(second.losses) == 12
    assert second.losses == pytest.approx(trained.losses, rel=1e-5)
    assert second.eval_loss_start == first.eval_loss_start  # before any training, not at the resume
    from safetensors.torch import load_file

    whole = load_file(str(trained.adapter / lora.WEIGHTS))
    resumed = load_file(str(tmp_path / "resumed" / lora.WEIGHTS))
    assert whole.keys() == resumed.keys()
    worst = max(float((whole[k] - resumed[k]).abs().max()) for k in whole)
    assert worst < 1e-6, worst


def generate(stub, emotion: str, seconds: float) -> np.ndarray:
    events = list(stub.Generate(music_pb2.GenerateRequest(
        spans=timeline((emotion, 0.0, seconds)), format=common_pb2.AudioFormat(
            sample_rate_hz=RATE, channels=2, encoding=common_pb2.ENCODING_PCM_F32LE)), timeout=600))
    assert events[0].header.backend == vocab.MUSIC_RIFFUSION
    pcm = b"".join(e.chunk.pcm for e in events[1:])
    return np.frombuffer(pcm, dtype="<f4").reshape(-1, 2)


def test_the_music_service_loads_the_adapter_and_it_changes_the_music(trained, base, loop):
    outputs = {}
    for scale in (0.0, 1.0):
        settings = MusicSettings(backend=vocab.MUSIC_RIFFUSION, riffusion_model=str(base), device="cpu", steps=3,
                                 lora=str(trained.adapter), lora_scale=scale)
        running = start(loop, [MusicServicer(settings, ServerSettings())])
        try:
            outputs[scale] = generate(music_pb2_grpc.MusicGeneratorStub(channel(running.address)), vocab.JOY, 3.0)
        finally:
            loop.run(running.stop(0))
    off, on = outputs[0.0], outputs[1.0]
    assert off.shape == on.shape == (3 * RATE, 2)
    difference = float(np.sqrt(np.mean((off - on) ** 2)) / np.sqrt(np.mean(off**2)))
    print(f"\nadapter at scale 1 against scale 0: relative difference {difference:.3f}")
    assert difference > 0.05


def test_an_adapter_that_is_not_one_is_refused_with_what_to_do(tmp_path, base):
    with pytest.raises(Unsupported, match=r"is not a LoRA adapter .*python -m services\.music\.train"):
        lora.read_info(tmp_path)
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(4, 999),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.zeros(999, 4)},
              str(tmp_path / lora.WEIGHTS))
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(base), safety_checker=None,
                                                          requires_safety_checker=False)
    with pytest.raises(Unsupported, match="does not fit this model"):
        lora.apply(pipe, tmp_path, 1.0)
    with pytest.raises(ValueError, match="BGM_MUSIC_LORA_SCALE"):
        MusicSettings(lora_scale=3.0)


def test_tritons_model_loads_the_adapter_and_the_triton_backend_prompts_in_its_words(trained, base):
    """The Triton model (model.py, LORA parameter) renders with the adapter; the music
    service's triton backend, given the same folder, builds the adapter's prompts."""
    from services.music import backends
    from tests import triton_server

    plain = triton_server.load_model(base)
    adapted = triton_server.load_model(base, LORA=str(trained.adapter), LORA_SCALE="1.0")
    assert plain.engine.adapter is None and adapted.engine.adapter is not None
    image = np.full((512, 512, 3), 200, dtype=np.uint8)
    prompt = lora.read_info(trained.adapter).prompt(vocab.JOY, 110)
    renders = [m.engine.render(image, prompt, prompt, 0.0, 3, 4, 0.0, 3, 7.0, 0.75) for m in (plain, adapted)]
    assert float(np.abs(renders[0] - renders[1]).mean()) > 1.0  # pixel values 0..255

    server = triton_server.start(adapted)
    try:
        settings = MusicSettings(backend=vocab.MUSIC_TRITON, triton_url=server.address, lora=str(trained.adapter))
        backend = backends.create(vocab.MUSIC_TRITON, backends.Context(settings, {}))
        assert backend.adapter is not None  # type: ignore[attr-defined]
        assert backend.adapter.prompt(vocab.SADNESS, 78) == (  # type: ignore[attr-defined]
            "sadness music, nostalgic mood, acoustic, 78 bpm, A minor")
    finally:
        server.stop(0)


def test_bgm_remix_with_riffusion_and_the_adapter_outlasts_the_mixers_idle_timeout(trained, base, tmp_path):
    """The README's third step, on the tiny model: `bgm remix` with Riffusion and the adapter.
    A clip takes about 10 s to decode on a CPU, far past the 3 s idle timeout the mixer gets
    here: the gateway keeps the mix stream alive while the music is made."""
    import os
    import subprocess
    import sys

    from tests.media_files import colour_video, duration

    speech = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "What a lovely morning this is."], check=True)
    video = colour_video(tmp_path / "talk.mp4", 4.0, speech)
    out = tmp_path / "talk.scored.mp4"
    env = os.environ | {"BGM_MUSIC_BACKEND": vocab.MUSIC_RIFFUSION, "BGM_MUSIC_DEVICE": "cpu", "BGM_MUSIC_STEPS": "1",
                        "BGM_MUSIC_RIFFUSION_MODEL": str(base), "BGM_MUSIC_LORA": str(trained.adapter),
                        "BGM_MIXER_IDLE_TIMEOUT_S": "3", "BGM_GATEWAY_IDLE_TIMEOUT_S": "3", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "remix", str(video), "-o", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert abs(duration(out) - 4.0) < 0.1
