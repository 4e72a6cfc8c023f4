"""The Riffusion backend: Stable Diffusion fine-tuned on spectrograms, through diffusers.

Each span keeps its own beat: its tempo is the composer's for that span (whole beats that
fill it exactly), its clips start on its downbeat and follow each other a whole number of
beats apart, and each clip's img2img seed image is a composer render of the span's emotion
at that tempo, starting on a downbeat. So every join between clips, and every change of
emotion, falls on a beat of the music that follows it. Consecutive clips walk between
neighbouring noise seeds of one seed family (slerp), so they vary but keep one style.
Clips are joined with a one-beat equal-power crossfade that starts on the incoming clip's
first beat; the result is trimmed to the timeline to the sample.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgm import logs, models, vocab
from bgm.audio import resample
from bgm.errors import Unsupported
from services.music import lora as lora_adapter
from services.music import spectrogram
from services.music.composer import BEATS_PER_BAR, ComposerBackend
from services.music.styles import PROMPTS

log = logs.get("bgm.music.riffusion")
P = spectrogram.PARAMS
RATE = P.sample_rate


class Cancelled(RuntimeError):
    pass


@dataclass(frozen=True)
class Clip:
    start_s: float  # on a beat of its span's grid (the first clip of a span: its downbeat)
    emotion: str
    span: int  # which span it belongs to
    tempo: float  # its span's tempo (BPM)
    # Position in the seed family walk: noise slerps from seed k to seed k+1 by ``walk``.
    seed_index: int
    walk: float

    @property
    def beat_s(self) -> float:
        return 60.0 / self.tempo


# Griffin-Lim gives (frames - 1) hops of audio for a 512-frame image.
CLIP_SECONDS = (P.width - 1) * P.hop_length / RATE


def hop_beats(beat_s: float, overlap_s: float) -> int:
    """How many whole beats apart a span's clips start: as many as leave at least the overlap
    and one beat (the crossfade) of each clip for the next to fade in over."""
    return max(1, math.floor((CLIP_SECONDS - max(overlap_s, beat_s)) / beat_s + 1e-9))


def plan_clips(spans: Sequence[tuple[str, float, float]], overlap_s: float, tempos: Sequence[float],
               walk_steps: int = 4) -> list[Clip]:
    """Per span, clips from its downbeat, ``hop_beats`` beats apart, until one reaches the
    span's end plus the next span's crossfade (one of its beats)."""
    clips: list[Clip] = []
    for index, (emotion, start, end) in enumerate(spans):
        beat = 60.0 / tempos[index]
        hop = hop_beats(beat, overlap_s) * beat
        fade_next = 60.0 / tempos[index + 1] if index + 1 < len(spans) else 0.0
        t = start
        while True:
            k = len(clips)
            clips.append(Clip(t, emotion, index, tempos[index], k // walk_steps, (k % walk_steps) / walk_steps))
            if t + CLIP_SECONDS >= end + fade_next - 1e-9:
                break
            t += hop
    return clips


def beat_join(pieces: Sequence[np.ndarray], clips: Sequence[Clip], total: int) -> np.ndarray:
    """Lay each clip at its start, each one fading in over its first beat (equal power) while
    the one before fades out over the same beat and stops; clip audio runs CLIP_SECONDS."""
    starts = [round(c.start_s * RATE) for c in clips]
    fades = [round(c.beat_s * RATE) for c in clips]  # the crossfade into each clip: one of its beats
    out = np.zeros(total, dtype=np.float32)
    for k, piece in enumerate(pieces):
        last = k + 1 == len(clips)
        stop = total if last else min(total, starts[k + 1] + fades[k + 1])
        piece = piece[: max(0, stop - starts[k])].copy()
        if k > 0:
            _ramp(piece, 0, fades[k], np.sin)
        if not last:
            _ramp(piece, starts[k + 1] - starts[k], fades[k + 1], np.cos)
        out[starts[k] : starts[k] + piece.shape[0]] += piece
    return out


def _ramp(piece: np.ndarray, begin: int, length: int, shape: Callable[[np.ndarray], np.ndarray]) -> None:
    """Multiply ``length`` samples of ``piece`` from ``begin`` by an equal-power quarter
    wave (``np.sin`` rises, ``np.cos`` falls), in place, as far as the piece reaches."""
    n = max(0, min(length, piece.shape[0] - begin))
    piece[begin : begin + n] *= shape(np.linspace(0, np.pi / 2, length, dtype=np.float32))[:n]


def slerp(t: float, a: Any, b: Any) -> Any:
    """Spherical interpolation between two noise tensors (keeps their Gaussian statistics)."""
    import torch

    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    dot = torch.clamp((a_flat / a_flat.norm()) @ (b_flat / b_flat.norm()), -1.0, 1.0)
    if abs(float(dot)) > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.arccos(dot)
    sin = torch.sin(theta)
    wa = torch.sin((1 - t) * theta) / sin
    wb = torch.sin(t * theta) / sin
    return (wa * a.double() + wb * b.double()).to(a.dtype)


def local_model_available(model: str) -> bool:
    if Path(model).is_dir():
        return True
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model, local_files_only=True)
        return True
    except Exception:
        return False


class DiffusionEngine:
    """Stable Diffusion img2img with Riffusion-style blending, on this machine (diffusers).

    ``render`` takes the seed image and two prompts with a blend between them, and two noise
    seeds with a walk between them; it is also what the Triton model runs server-side.
    """

    concurrency = 1  # one pipeline in this process: clips one after another

    def __init__(self, model: str, device: str = vocab.AUTO, lora: str = "", lora_scale: float = 1.0) -> None:
        try:
            import torch
            from diffusers import StableDiffusionImg2ImgPipeline
        except ImportError as exc:
            raise Unsupported("diffusers and torch are not installed (pip install 'bgm[music-full]')") from exc
        self.torch = torch
        self.device = models.torch_device(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            model, dtype=self.dtype, safety_checker=None, requires_safety_checker=False)
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._lock = threading.Lock()
        # A LoRA adapter on top of the base model (services.music.train), and its prompts.
        self.adapter = lora_adapter.apply(self.pipe, lora, lora_scale) if lora else None
        log.info("diffusion pipeline loaded", extra={"fields": {"model": model, "device": self.device,
                                                                "dtype": str(self.dtype)}})

    @classmethod
    def from_pipeline(cls, pipe: Any) -> DiffusionEngine:
        """An engine over a pipeline already in memory (training renders its checkpoints)."""
        import torch

        engine = cls.__new__(cls)
        engine.torch, engine.pipe, engine.adapter = torch, pipe, None
        engine.device, engine.dtype = str(pipe.unet.device), pipe.unet.dtype
        engine._lock = threading.Lock()
        return engine

    def _embed(self, prompts: list[str]) -> Any:
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0]

    def _noise(self, seed: int) -> Any:
        shape = (1, self.pipe.unet.config.in_channels, P.n_mels // 8, P.width // 8)
        generator = self.torch.Generator(device="cpu").manual_seed(seed)
        return self.torch.randn(shape, generator=generator, dtype=self.torch.float32).to(self.device, self.dtype)

    def render(self, image: np.ndarray, prompt_from: str, prompt_to: str, blend: float, seed_a: int, seed_b: int,
               walk: float, steps: int, guidance: float, strength: float,
               cancel: threading.Event | None = None) -> np.ndarray:
        """One img2img pass (our own loop, so cancellation is checked between steps)."""
        torch = self.torch
        pipe = self.pipe
        with self._lock, torch.inference_mode():
            embedding = (1 - blend) * self._embed([prompt_from]) + blend * self._embed([prompt_to])
            noise = slerp(walk, self._noise(seed_a), self._noise(seed_b))
            pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            pixels = pixels.to(self.device, self.dtype)
            vae = pipe.vae
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
            scheduler = pipe.scheduler
            scheduler.set_timesteps(steps, device=self.device)
            keep = min(steps, max(1, round(steps * strength)))
            timesteps = scheduler.timesteps[steps - keep :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(steps - keep)
            latents = scheduler.add_noise(latents, noise, timesteps[:1])
            context = torch.cat([self._embed([""]), embedding])
            for t in timesteps:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("generation cancelled")
                model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                predicted = pipe.unet(model_in, t, encoder_hidden_states=context).sample
                uncond_pred, text_pred = predicted.chunk(2)
                latents = scheduler.step(uncond_pred + guidance * (text_pred - uncond_pred), t, latents).prev_sample
            decoded = vae.decode(latents / vae.config.scaling_factor).sample
            out = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
        return np.asarray(out)


class TritonEngine:
    """The same ``render``, run by a Triton Inference Server (model ``riffusion``, gRPC)."""

    def __init__(self, url: str, model: str = vocab.MUSIC_RIFFUSION, timeout_s: float = 600.0,
                 wait_s: float = 0.0, concurrency: int = 1) -> None:
        try:
            import tritonclient.grpc as triton
        except ImportError as exc:
            raise Unsupported("tritonclient is not installed (pip install 'bgm[music-full]')") from exc
        self.triton = triton
        self.client = triton.InferenceServerClient(url)
        self.model = model
        self.timeout_s = timeout_s
        # Clips are independent: a request's clips go to the server this many at a time, so
        # Triton's model instances (config.pbtxt's instance_group) work in parallel.
        self.concurrency = concurrency
        self._wait_ready(url, wait_s)

    def _wait_ready(self, url: str, wait_s: float) -> None:
        """Triton and this service start side by side: wait for the model (the caller stays
        NOT_SERVING), then give up with what was last seen."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.client.is_model_ready(self.model, client_timeout=min(self.timeout_s, 10.0)):
                    return
                seen = f"has no ready model {self.model!r}"
            except self.triton.InferenceServerException as exc:
                seen = f"cannot be reached ({exc.message() or exc})"
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:.0f} s (BGM_MUSIC_TRITON_WAIT_S)" if wait_s else ""
                raise Unsupported(f"the Triton server at {url} {seen}{waited}")
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def render(self, image: np.ndarray, prompt_from: str, prompt_to: str, blend: float, seed_a: int, seed_b: int,
               walk: float, steps: int, guidance: float, strength: float,
               cancel: threading.Event | None = None) -> np.ndarray:
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        t = self.triton
        values: dict[str, np.ndarray] = {
            "IMAGE": np.ascontiguousarray(image, dtype=np.uint8),
            "PROMPT_FROM": np.array([prompt_from.encode()], dtype=object),
            "PROMPT_TO": np.array([prompt_to.encode()], dtype=object),
            "BLEND": np.array([blend], dtype=np.float32),
            "SEEDS": np.array([seed_a, seed_b], dtype=np.int64),
            "WALK": np.array([walk], dtype=np.float32),
            "STEPS": np.array([steps], dtype=np.int32),
            "GUIDANCE": np.array([guidance], dtype=np.float32),
            "STRENGTH": np.array([strength], dtype=np.float32),
        }
        inputs = []
        for name, value in values.items():
            datatype = "BYTES" if value.dtype == object else t.np_to_triton_dtype(value.dtype)
            tensor = t.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        result = self.client.infer(self.model, inputs, outputs=[t.InferRequestedOutput("SPECTROGRAM")],
                                   client_timeout=self.timeout_s)
        return np.asarray(result.as_numpy("SPECTROGRAM"), dtype=np.float32)


class RiffusionBackend:
    name = vocab.MUSIC_RIFFUSION

    def __init__(self, model: str, device: str = vocab.AUTO, steps: int = 30, guidance: float = 7.0,
                 strength: float = 0.75, overlap_s: float = 0.5, composer: ComposerBackend | None = None,
                 engine: DiffusionEngine | TritonEngine | None = None, lora: str = "", lora_scale: float = 1.0) -> None:
        self.engine = engine if engine is not None else DiffusionEngine(model, device, lora, lora_scale)
        self.name = vocab.MUSIC_TRITON if isinstance(self.engine, TritonEngine) else vocab.MUSIC_RIFFUSION
        # With an adapter, prompts use its captions' words. Triton loads the weights itself
        # (the same path, BGM_MUSIC_LORA in its environment); the prompts are built here.
        local = getattr(self.engine, "adapter", None)
        self.adapter = local if local is not None else (lora_adapter.read_info(lora) if lora else None)
        self.steps, self.guidance, self.strength, self.overlap_s = steps, guidance, strength, overlap_s
        self.composer = composer or ComposerBackend()
        # Phase recovery runs on the diffusion model's GPU when it has one (Triton's is remote).
        self.phase_device = str(getattr(self.engine, "device", ""))
        self._seed_images: dict[tuple[str, float, int], tuple[np.ndarray, float]] = {}

    def seed_image(self, emotion: str, tempo: float, seed: int) -> tuple[np.ndarray, float]:
        """A composer render of the emotion at exactly ``tempo`` from a downbeat (whole bars,
        cut to a clip), as a spectrogram image."""
        key = (emotion, round(tempo, 3), seed)
        if key not in self._seed_images:
            bar_s = BEATS_PER_BAR * 60.0 / tempo
            bars = math.ceil(P.clip_seconds / bar_s)
            audio, _ = self.composer.generate([(emotion, 0.0, bars * bar_s)], sample_rate=RATE, seed=seed,
                                              tempo=tempo)
            self._seed_images[key] = spectrogram.audio_to_image(audio[: round(P.clip_seconds * RATE)].mean(axis=1))
        return self._seed_images[key]

    def span_tempos(self, spans: Sequence[tuple[str, float, float]], tempo: float | None) -> list[float]:
        """Each span's tempo: the composer's (whole bars filling the span)."""
        return [self.composer.span_tempo(emotion, round((end - start) * RATE), RATE, tempo)
                for emotion, start, end in spans]

    def generate(self, spans: Sequence[tuple[str, float, float]], *, sample_rate: int, seed: int,
                 tempo: float | None, cancel: threading.Event | None = None, steps: int | None = None,
                 guidance: float | None = None, strength: float | None = None) -> tuple[np.ndarray, float]:
        steps = steps or self.steps
        guidance = self.guidance if guidance is None else guidance
        strength = self.strength if strength is None else strength
        tempos = self.span_tempos(spans, tempo)
        total = round(spans[-1][2] * RATE)
        clips = plan_clips(spans, self.overlap_s, tempos)
        seeds = [self.seed_image(clip.emotion, clip.tempo, seed) for clip in clips]

        def render(index: int) -> np.ndarray:
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            clip, (image, max_value) = clips[index], seeds[index]
            prompt = self.adapter.prompt(clip.emotion, clip.tempo) if self.adapter else PROMPTS[clip.emotion]
            out_image = self.engine.render(image, prompt, prompt, 0.0, seed + clip.seed_index,
                                           seed + clip.seed_index + 1, clip.walk, steps, guidance, strength, cancel)
            mel = spectrogram.spectrogram_from_image(out_image, max_value)
            return spectrogram.audio_from_spectrogram(mel, seed=seed, device=self.phase_device)

        workers = min(self.engine.concurrency, len(clips))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="triton-clip") as pool:
                rendered = list(pool.map(render, range(len(clips))))
        else:
            rendered = [render(i) for i in range(len(clips))]
        mono = beat_join(rendered, clips, total)
        peak = float(np.abs(mono).max()) or 1.0
        mono = mono * (0.89 / peak)
        fade = min(total, int(0.05 * RATE))  # no click at the very start and end
        mono[:fade] *= np.linspace(0, 1, fade, dtype=np.float32)
        mono[total - fade :] *= np.linspace(1, 0, fade, dtype=np.float32)
        stereo = np.repeat(mono[:, None], 2, axis=1)
        if sample_rate != RATE:
            stereo = resample(stereo, RATE, sample_rate)
            exact = round(spans[-1][2] * sample_rate)
            if stereo.shape[0] >= exact:
                stereo = stereo[:exact]
            else:
                stereo = np.pad(stereo, ((0, exact - stereo.shape[0]), (0, 0)))
        return stereo.astype(np.float32), tempos[0]
