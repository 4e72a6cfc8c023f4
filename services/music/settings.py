from __future__ import annotations

from dataclasses import dataclass

from bgm import vocab
from bgm.settings import check


@dataclass(frozen=True)
class MusicSettings:
    """``BGM_MUSIC_*``."""

    # composer (offline default), riffusion (diffusers here), triton (the diffusion model
    # served by Triton at triton_url), or auto: Riffusion on a GPU when its weights are
    # present locally, else the composer.
    backend: str = vocab.AUTO
    triton_url: str = "localhost:8001"
    triton_model: str = vocab.MUSIC_RIFFUSION  # the model's name in Triton's repository
    triton_timeout_s: float = 600.0
    # How long loading waits for Triton's model to become ready (the service stays
    # NOT_SERVING meanwhile), and how many clips of a request are sent to it at once (match
    # the model's instance count in config.pbtxt).
    triton_wait_s: float = 900.0
    triton_concurrency: int = 2
    seed: int = 1234
    # Hub name or local directory of a Stable Diffusion img2img pipeline.
    riffusion_model: str = "riffusion/riffusion-model-v1"
    device: str = vocab.AUTO
    steps: int = 30
    guidance: float = 7.0
    denoising_strength: float = 0.75
    clip_overlap_s: float = 0.5
    # A LoRA adapter folder (python -m services.music.train) loaded on top of the model, and
    # how strongly it applies (0 = the base model alone; above 1 exaggerates it).
    lora: str = ""
    lora_scale: float = 1.0
    # Rendered spans are kept by content (bgm.cache): in memory, and in this folder when set,
    # up to cache_mb there, so a re-render of an edited timeline reuses every unchanged span.
    # The memory level is small (about three minutes of 48 kHz stereo): it fills as a long
    # programme is rendered, and 256 MB there made the service's peak grow with length.
    cache_dir: str = ""
    cache_mb: int = 4096
    memory_cache_mb: int = 64

    def __post_init__(self) -> None:
        check(self.backend in (vocab.AUTO, *vocab.MUSIC_BACKENDS), "BGM_MUSIC_BACKEND",
              f"{self.backend!r} is not {vocab.choices((vocab.AUTO, *vocab.MUSIC_BACKENDS))}")
        check(1 <= self.steps <= 200, "BGM_MUSIC_STEPS", "must be 1..200")
        check(0 < self.denoising_strength <= 1, "BGM_MUSIC_DENOISING_STRENGTH", "must be in (0, 1]")
        check(self.cache_mb >= 0, "BGM_MUSIC_CACHE_MB", "must be 0 or more")
        check(self.memory_cache_mb >= 0, "BGM_MUSIC_MEMORY_CACHE_MB", "must be 0 or more")
        check(self.triton_wait_s >= 0, "BGM_MUSIC_TRITON_WAIT_S", "must not be negative")
        check(1 <= self.triton_concurrency <= 64, "BGM_MUSIC_TRITON_CONCURRENCY", "must be 1..64")
        check(0 <= self.clip_overlap_s <= 2, "BGM_MUSIC_CLIP_OVERLAP_S", "must be 0..2")
        check(0 <= self.lora_scale <= 2, "BGM_MUSIC_LORA_SCALE", "must be 0..2")
