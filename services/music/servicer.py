"""The MusicGenerator gRPC servicer: a timeline in, audio covering it exactly streamed out."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from grpc import aio

from bgm import audio, cache, limits, media, settings, vocab
from bgm.chunks import CHUNK_BYTES
from bgm.errors import ConcurrencyLimiter, InvalidInput, Unsupported
from bgm.limits import check_range
from bgm.server import ModelServicer, Servicer
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, music_pb2, music_pb2_grpc
from services.music import backends, levels, styles
from services.music.settings import MusicSettings

# Spans must meet exactly; this absorbs float noise from upstream arithmetic.
TOLERANCE_S = 1e-6
DEFAULT_RATE = 44_100
MAX_RATE = vocab.SEPARATION_RATE


@dataclass(frozen=True)
class GenerateOptions:
    """What one request asks of its backend, checked."""

    backend: str
    seed: int
    tempo: float | None
    steps: int | None
    guidance: float | None
    strength: float | None


@dataclass(frozen=True)
class SpanControls:
    """A span's creator settings, resolved: its seed is always known."""

    variant: str
    intensity: float | None
    seed: int


class MusicServicer(ModelServicer, music_pb2_grpc.MusicGeneratorServicer):
    service_name = music_pb2.DESCRIPTOR.services_by_name["MusicGenerator"].full_name

    def __init__(self, music: MusicSettings, server: ServerSettings) -> None:
        super().__init__()
        self.settings = music
        self.server = server
        self.limiter = ConcurrencyLimiter(server.max_concurrency, "the music service")
        self.backends: dict[str, backends.MusicBackend] = {}
        self.default_backend = vocab.MUSIC_COMPOSER
        self.loading = asyncio.Lock()
        self.cache = cache.ArrayCache(music.cache_dir, music.memory_cache_mb * 2**20, music.cache_mb * 2**20)

    def add_to_server(self, server: aio.Server) -> None:
        music_pb2_grpc.add_MusicGeneratorServicer_to_server(self, server)

    async def load(self) -> None:
        names = await asyncio.to_thread(backends.at_start, self.settings)
        for name in names:
            await self.backend(name)
        self.default_backend = names[-1]
        self.ready = True

    async def backend(self, name: str) -> backends.MusicBackend:
        """The named backend, loaded once (off the loop, under a lock)."""
        async with self.loading:
            if name not in self.backends:
                context = backends.Context(self.settings, dict(self.backends))
                self.backends[name] = await asyncio.to_thread(backends.create, name, context)
        return self.backends[name]

    def timeline(self, request: music_pb2.GenerateRequest) -> list[tuple[str, float, float]]:
        if not request.spans:
            raise InvalidInput("the timeline is empty: send at least one span")
        spans = []
        expected_start = 0.0
        for i, span in enumerate(request.spans):
            name = vocab.emotion_name(span.emotion)
            if name is None:
                choices = ", ".join(sorted(vocab.EMOTIONS))
                raise InvalidInput(f"span {i}: unknown emotion {span.emotion}; use one of {choices}")
            start, end = span.span.start_s, span.span.end_s
            if not (math.isfinite(start) and math.isfinite(end)):
                raise InvalidInput(f"span {i}: times must be finite numbers")
            if abs(start - expected_start) > TOLERANCE_S:
                kind = "a hole" if start > expected_start else "an overlap"
                raise InvalidInput(
                    f"span {i} starts at {start:g} s but the previous one ends at {expected_start:g} s ({kind}); "
                    "spans must be sorted and meet exactly, starting at 0")
            if end <= start:
                raise InvalidInput(f"span {i}: end {end:g} s is not after start {start:g} s")
            spans.append((name, expected_start, end))
            expected_start = end
        if expected_start > self.server.max_duration_s:
            raise media.too_long(f"the timeline ({media.format_duration(expected_start)})",
                                 self.server.max_duration_s, f"{vocab.MUSIC.env_prefix}_MAX_DURATION_S")
        return spans

    def controls(self, request: music_pb2.GenerateRequest, base_seed: int) -> list[SpanControls]:
        """Each span's style, intensity and seed: its own control's, else the request's."""
        whole = request.style
        if whole.style and whole.style not in styles.VARIANTS:
            raise InvalidInput(f"unknown style {whole.style!r}; use {vocab.choices(tuple(styles.VARIANTS))} "
                               "or leave it empty")
        if whole.HasField("intensity"):
            check_range("intensity", whole.intensity, 0.0, 1.0)
        resolved = []
        for i, span in enumerate(request.spans):
            control = span.control
            if control.style and control.style not in styles.VARIANTS:
                raise InvalidInput(f"span {i}: unknown style {control.style!r}; use "
                                   f"{vocab.choices(tuple(styles.VARIANTS))} or leave it empty")
            intensity = (control.intensity if control.HasField("intensity")
                         else whole.intensity if whole.HasField("intensity") else None)
            if control.HasField("intensity"):
                check_range(f"span {i}: intensity", control.intensity, 0.0, 1.0)
            seed = control.seed if control.HasField("seed") else backends.span_seed(base_seed, span.span.start_s)
            resolved.append(SpanControls(control.style or whole.style, intensity, seed))
        return resolved

    def output_format(self, request: music_pb2.GenerateRequest) -> common_pb2.AudioFormat:
        fmt = common_pb2.AudioFormat()
        fmt.CopyFrom(request.format)
        if not fmt.sample_rate_hz:
            fmt.sample_rate_hz = DEFAULT_RATE
        if not fmt.channels:
            fmt.channels = 2
        if fmt.encoding == common_pb2.ENCODING_UNSPECIFIED:
            fmt.encoding = common_pb2.ENCODING_PCM_F32LE
        if fmt.encoding == common_pb2.ENCODING_CONTAINER:
            raise InvalidInput("music is returned as raw PCM: use PCM_F32LE or PCM_S16LE")
        audio.check_format(fmt, "format")
        if fmt.sample_rate_hz > MAX_RATE:
            # Rendered at 48 kHz at most: a higher rate would only cost memory (its cost is
            # duration x rate x channels).
            raise InvalidInput(f"format.sample_rate_hz {fmt.sample_rate_hz} is above {MAX_RATE} Hz, "
                               "the highest rate music is made at; ask for 48000 or less")
        if fmt.channels > 2:
            raise InvalidInput("music is mono or stereo: set format.channels to 1 or 2")
        return fmt

    def options(self, request: music_pb2.GenerateRequest) -> GenerateOptions:
        style = request.style
        backend = style.backend or vocab.AUTO
        if backend == vocab.AUTO:
            backend = self.default_backend
        entry = backends.REGISTRY.get(backend)
        if entry is None:
            raise InvalidInput(f"unknown music backend {backend!r}; use {vocab.choices(tuple(backends.REGISTRY))}")
        if backend not in self.backends and not entry.on_demand:
            raise Unsupported(f"the {backend} backend is not loaded in this deployment "
                              f"(set BGM_MUSIC_BACKEND={backend} and install bgm[{entry.extra}]); "
                              f"use '{vocab.MUSIC_COMPOSER}'")
        tempo = style.tempo_bpm if style.HasField("tempo_bpm") else None
        if tempo is not None:
            check_range("tempo_bpm", tempo, *limits.TEMPO_BPM)
        if style.HasField("steps"):
            check_range("steps", style.steps, *limits.DIFFUSION_STEPS)
        if style.HasField("guidance"):
            check_range("guidance", style.guidance, *limits.GUIDANCE)
        if style.HasField("denoising_strength"):
            check_range("denoising_strength", style.denoising_strength, *limits.DENOISING_STRENGTH, low_open=True)
        return GenerateOptions(
            backend=backend,
            seed=style.seed if style.HasField("seed") else self.settings.seed,
            tempo=tempo,
            steps=style.steps if style.HasField("steps") else None,
            guidance=style.guidance if style.HasField("guidance") else None,
            strength=style.denoising_strength if style.HasField("denoising_strength") else None,
        )

    @staticmethod
    def _render(backend: backends.MusicBackend, options: GenerateOptions, spans: backends.Spans,
                fmt: common_pb2.AudioFormat, cancel: threading.Event) -> tuple[np.ndarray, float]:
        """The music for ``spans`` in ``fmt``'s rate and channels, every span levelled."""
        rate = fmt.sample_rate_hz
        music, used_tempo = backend.generate(
            spans, sample_rate=rate, seed=options.seed, tempo=options.tempo, cancel=cancel, steps=options.steps,
            guidance=options.guidance, strength=options.strength)
        music = levels.level_spans(music, spans, rate)
        if fmt.channels == 1:
            music = music.mean(axis=1, keepdims=True)
        return music, used_tempo

    async def Generate(
        self, request: music_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[music_pb2.GenerateResponse]:
        self.require_ready()
        with self.limiter:
            spans = self.timeline(request)
            fmt = self.output_format(request)
            options = self.options(request)
            backend = await self.backend(options.backend)
            controls = self.controls(request, options.seed)
            if backends.renders_spans(backend):
                async for message in self._by_span(backend, options, spans, controls, request, fmt):  # type: ignore[arg-type]
                    yield message
                return
            cancel = threading.Event()
            try:
                music, used_tempo = await asyncio.to_thread(self._render, backend, options, spans, fmt, cancel)
            finally:
                cancel.set()  # the RPC ended or was cancelled: a generation still running stops
            tempos = backends.span_tempos(backend, spans, options.tempo, used_tempo)
            yield music_pb2.GenerateResponse(header=music_pb2.MusicHeader(
                format=fmt, total_samples=music.shape[0], tempo_bpm=used_tempo, backend=backend.name,
                seed=options.seed, span_tempos_bpm=tempos))
            for message in span_chunks(music, spans, request, fmt):
                yield message

    def _span(self, backend: backends.SpanRenderer, options: GenerateOptions, emotion: str, frames: int,
              control: SpanControls, rate: int, joined: tuple[bool, bool]) -> np.ndarray:
        """One span's levelled stereo music: from the cache, or rendered and kept there."""
        name = cache.key(backend.name, backend.version, emotion, frames, rate, control.seed, options.tempo,
                         control.variant, control.intensity, levels.SPAN_LUFS, *joined)
        found = self.cache.get(name)
        if found is not None:
            return found
        piece = backend.render_span(emotion, frames, sample_rate=rate, seed=control.seed, tempo=options.tempo,
                                    variant=control.variant, intensity=control.intensity, joined=joined)
        piece = levels.level_span(piece, emotion, rate, control.intensity)
        self.cache.put(name, piece)
        return piece

    async def _by_span(self, backend: backends.SpanRenderer, options: GenerateOptions,
                       spans: Sequence[tuple[str, float, float]], controls: Sequence[SpanControls],
                       request: music_pb2.GenerateRequest, fmt: common_pb2.AudioFormat
                       ) -> AsyncIterator[music_pb2.GenerateResponse]:
        """Span after span, each rendered (or found in the cache) and streamed before the next:
        memory holds one piece of a span (see PIECE_S), and the caller starts on the first while
        the rest are made."""
        rate = fmt.sample_rate_hz
        bounds = [round(start * rate) for _, start, _ in spans] + [round(spans[-1][2] * rate)]
        last = len(spans) - 1
        tempos = [backend.span_tempo(emotion, bounds[i + 1] - bounds[i], rate, options.tempo, (i > 0, i < last))
                  for i, (emotion, _, _) in enumerate(spans)]
        yield music_pb2.GenerateResponse(header=music_pb2.MusicHeader(
            format=fmt, total_samples=bounds[-1], tempo_bpm=tempos[0], backend=backend.name, seed=options.seed,
            span_seeds=[c.seed for c in controls], span_tempos_bpm=tempos))
        for index, ((emotion, _, _), control) in enumerate(zip(spans, controls, strict=True)):
            first = bounds[index]
            lengths = piece_lengths(bounds[index + 1] - bounds[index], rate)
            for part, frames in enumerate(lengths):
                seed = control.seed if part == 0 else backends.span_seed(control.seed, part * PIECE_S)
                # The tempo glides at the span's joins, not between its own pieces.
                joined = (index > 0 and part == 0, index < last and part == len(lengths) - 1)
                piece = await asyncio.to_thread(self._span, backend, options, emotion, frames,
                                                replace(control, seed=seed), rate, joined)
                if fmt.channels == 1:
                    piece = piece.mean(axis=1, keepdims=True)
                for message in piece_chunks(piece, index, request.spans[index].emotion, first, fmt):
                    yield message
                first += frames
                del piece  # memory holds one piece at a time


# A span longer than this is made in equal pieces, each the span's emotion with a seed of its
# own (the first keeps the span's): memory then holds one piece, however long the span (a
# 30-minute span was one 690 MB array, and more in its levelling), and a long span does not
# repeat one composition for its whole length.
PIECE_S = 120.0


def piece_lengths(frames: int, rate: int) -> list[int]:
    """``frames`` split into the fewest equal pieces of at most PIECE_S."""
    count = max(1, -(-frames // max(1, int(PIECE_S * rate))))
    size, extra = divmod(frames, count)
    return [size + (1 if i < extra else 0) for i in range(count)]


def piece_chunks(piece: np.ndarray, index: int, emotion: int, first: int, fmt: common_pb2.AudioFormat
                 ) -> Iterator[music_pb2.GenerateResponse]:
    """One span's audio (starting at frame ``first`` of the timeline) as tagged chunks."""
    frames_per_chunk = max(1, CHUNK_BYTES // audio.bytes_per_frame(fmt))
    for begin in range(0, piece.shape[0], frames_per_chunk):
        yield music_pb2.GenerateResponse(chunk=music_pb2.MusicChunk(
            span_index=index, emotion=emotion, start_sample=first + begin,  # type: ignore[arg-type]
            pcm=audio.float_to_pcm(piece[begin:begin + frames_per_chunk], fmt.encoding)))


def span_chunks(music: np.ndarray, spans: Sequence[tuple[str, float, float]],
                request: music_pb2.GenerateRequest, fmt: common_pb2.AudioFormat
                ) -> Iterator[music_pb2.GenerateResponse]:
    """Cut the audio at the span boundaries (rounded to samples) and into chunks, each tagged."""
    rate = fmt.sample_rate_hz
    frames_per_chunk = max(1, CHUNK_BYTES // audio.bytes_per_frame(fmt))
    for index, (_, start_s, end_s) in enumerate(spans):
        first = round(start_s * rate)
        last = music.shape[0] if index == len(spans) - 1 else round(end_s * rate)
        for begin in range(first, last, frames_per_chunk):
            stop = min(last, begin + frames_per_chunk)
            yield music_pb2.GenerateResponse(chunk=music_pb2.MusicChunk(
                span_index=index, emotion=request.spans[index].emotion, start_sample=begin,
                pcm=audio.float_to_pcm(music[begin:stop], fmt.encoding)))


def build() -> Sequence[Servicer]:
    return [MusicServicer(settings.load(MusicSettings, vocab.MUSIC.env_prefix),
                          settings.server_settings(vocab.MUSIC.name))]
