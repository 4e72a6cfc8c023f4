"""Checking a remix request's options before any work is done, so a bad value costs nothing."""

from __future__ import annotations

from bgm import limits, vocab
from bgm.errors import InvalidInput
from bgm.limits import check_range
from bgm.v1 import gateway_pb2, stt_pb2
from gateway import timeline


def validate(options: gateway_pb2.RemixOptions) -> None:
    limits.file_suffix(options.filename)
    if options.task not in (stt_pb2.STT_TASK_UNSPECIFIED, stt_pb2.STT_TASK_TRANSCRIBE, stt_pb2.STT_TASK_TRANSLATE):
        raise InvalidInput(f"task {options.task} is unknown; use TRANSCRIBE or TRANSLATE")
    if options.language and not limits.LANGUAGE_CODE.match(options.language):
        raise InvalidInput(f"language {options.language!r} is not an ISO 639-1 code such as 'en' or 'de'")
    smoothing = options.smoothing
    if smoothing.HasField("min_span_s"):
        check_range("smoothing.min_span_s", smoothing.min_span_s, 0, 3600)
    if smoothing.HasField("neutral_threshold"):
        check_range("smoothing.neutral_threshold", smoothing.neutral_threshold, 0, 1)
    music = options.music
    if music.backend not in ("", vocab.AUTO, *vocab.MUSIC_BACKENDS):
        raise InvalidInput(f"unknown music backend {music.backend!r}; use {vocab.choices(vocab.MUSIC_BACKENDS)}")
    if music.HasField("tempo_bpm"):
        check_range("music.tempo_bpm", music.tempo_bpm, *limits.TEMPO_BPM)
    if music.style and music.style not in vocab.MUSIC_STYLES:
        raise InvalidInput(f"unknown music style {music.style!r}; use {vocab.choices(vocab.MUSIC_STYLES)}")
    if music.HasField("intensity"):
        check_range("music.intensity", music.intensity, 0, 1)
    if music.HasField("steps"):
        check_range("music.steps", music.steps, *limits.DIFFUSION_STEPS)
    if music.HasField("guidance"):
        check_range("music.guidance", music.guidance, *limits.GUIDANCE)
    if music.HasField("denoising_strength"):
        check_range("music.denoising_strength", music.denoising_strength, *limits.DENOISING_STRENGTH,
                    low_open=True)
    mix = options.mix
    for field, (low, high) in limits.MIX_RANGES.items():
        if mix.HasField(field):  # type: ignore[arg-type]
            check_range(f"mix.{field}", getattr(mix, field), low, high)
    if options.separation_backend not in ("", *vocab.SEPARATION_BACKENDS):
        raise InvalidInput(f"unknown separation backend {options.separation_backend!r}; "
                           f"use {vocab.choices(vocab.SEPARATION_BACKENDS)}")
    if options.HasField("timeline"):
        timeline.check_spans(options.timeline.spans)
