"""Music backends behind one interface: a name -> factory registry, as diffusers' auto
pipelines map names to classes, with each backend's heavy imports inside its factory.

Adding a backend is one class (anything with ``name`` and ``generate``) and one line:
``register("name", Factory)``. A factory takes a ``Context`` (the service's settings and the
backends already loaded). Backends marked ``on_demand`` load on their first request; the
others only at start, when the deployment names them (``BGM_MUSIC_BACKEND``), because they
are heavy (a diffusion model) or need a server (Triton).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bgm import vocab
from bgm.errors import Unsupported
from services.music.settings import MusicSettings

Spans = Sequence[tuple[str, float, float]]  # (emotion, start_s, end_s), meeting exactly from 0


class MusicBackend(Protocol):
    name: str

    def generate(self, spans: Spans, *, sample_rate: int, seed: int, tempo: float | None,
                 cancel: threading.Event | None = None, steps: int | None = None, guidance: float | None = None,
                 strength: float | None = None) -> tuple[np.ndarray, float]:
        """Audio (n, 2) float32 covering the spans exactly, and the tempo it reports.

        ``steps``, ``guidance`` and ``strength`` steer diffusion backends; others ignore them.
        """
        ...


class SpanRenderer(Protocol):
    """A backend whose spans are independent pieces: each depends only on its own content,
    so the service renders, caches and streams them one at a time."""

    name: str
    version: str

    def span_tempo(self, emotion: str, frames: int, sample_rate: int, tempo: float | None,
                   joined: tuple[bool, bool] = (False, False)) -> float: ...

    def render_span(self, emotion: str, frames: int, *, sample_rate: int, seed: int, tempo: float | None,
                    variant: str = "", intensity: float | None = None,
                    joined: tuple[bool, bool] = (False, False)) -> np.ndarray:
        """``joined``: whether another span comes before and after this one (not which)."""
        ...


def span_tempos(backend: object, spans: Spans, tempo: float | None, reported: float) -> list[float]:
    """Each span's tempo, where the backend tells them apart (``span_tempos``); else the one
    tempo it reported, for every span."""
    tell = getattr(backend, "span_tempos", None)
    return list(tell(spans, tempo)) if callable(tell) else [reported] * len(spans)


def renders_spans(backend: object) -> bool:
    return callable(getattr(backend, "render_span", None))


def span_seed(base: int, start_s: float) -> int:
    """A span's seed when the request names none: from the request's seed and where the span
    starts (not its index, so splitting one span leaves the others' music as it was)."""
    digest = hashlib.sha256(f"{base}:{round(start_s * 1000)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Context:
    settings: MusicSettings
    loaded: Mapping[str, MusicBackend]


@dataclass(frozen=True)
class Entry:
    factory: Callable[[Context], MusicBackend]
    on_demand: bool  # may load on its first request (cheap); else only when configured at start
    extra: str  # the pip extra that installs it, for the error that says it is missing


def _composer(context: Context) -> MusicBackend:
    from services.music.composer import ComposerBackend

    return ComposerBackend()


def _diffusion(context: Context, triton: bool) -> MusicBackend:
    from services.music.riffusion import RiffusionBackend, TritonEngine

    s = context.settings
    composer = context.loaded.get(vocab.MUSIC_COMPOSER)
    engine = TritonEngine(s.triton_url, s.triton_model, s.triton_timeout_s, wait_s=s.triton_wait_s,
                          concurrency=s.triton_concurrency) if triton else None
    return RiffusionBackend(s.riffusion_model, s.device, s.steps, s.guidance, s.denoising_strength,
                            s.clip_overlap_s, composer=composer, engine=engine,  # type: ignore[arg-type]
                            lora=s.lora, lora_scale=s.lora_scale)


REGISTRY: dict[str, Entry] = {
    vocab.MUSIC_COMPOSER: Entry(_composer, on_demand=True, extra=vocab.MUSIC.name),
    vocab.MUSIC_RIFFUSION: Entry(lambda context: _diffusion(context, triton=False), on_demand=False,
                                 extra="music-full"),
    vocab.MUSIC_TRITON: Entry(lambda context: _diffusion(context, triton=True), on_demand=False, extra="music-full"),
}


def register(name: str, factory: Callable[[Context], MusicBackend], on_demand: bool = True,
             extra: str = vocab.MUSIC.name) -> None:
    REGISTRY[name] = Entry(factory, on_demand, extra)


def create(name: str, context: Context) -> MusicBackend:
    entry = REGISTRY.get(name)
    if entry is None:
        raise Unsupported(f"unknown music backend {name!r}; use {vocab.choices(tuple(REGISTRY))}")
    return entry.factory(context)


def diffusion_usable(settings: MusicSettings) -> bool:
    """``auto`` picks Riffusion where torch sees a GPU and the weights are on disk."""
    try:
        import torch

        from services.music.riffusion import local_model_available
    except ImportError:
        return False
    return bool(torch.cuda.is_available()) and local_model_available(settings.riffusion_model)


def at_start(settings: MusicSettings) -> list[str]:
    """The backends to load when the service starts, in order: the composer always (Riffusion
    renders its seed images with it), then the configured one (``auto``: Riffusion where usable)."""
    names = [vocab.MUSIC_COMPOSER]
    chosen = settings.backend
    if chosen == vocab.AUTO:
        chosen = vocab.MUSIC_RIFFUSION if diffusion_usable(settings) else vocab.MUSIC_COMPOSER
    if chosen not in names:
        names.append(chosen)
    return names
