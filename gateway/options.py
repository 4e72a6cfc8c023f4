"""Checking a remix request's options before any work is done, so a bad value costs nothing."""

from __future__ import annotations

import math
import re

from bgm.errors import InvalidInput
from bgm.v1 import gateway_pb2, stt_pb2

_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,6}$")


def _range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bracket = "(" if low_open else "["
        raise InvalidInput(f"{name} {value:g} is out of range {bracket}{low:g}, {high:g}]")


def validate(options: gateway_pb2.RemixOptions) -> None:
    name = options.filename
    if len(name) > 255 or "/" in name or "\\" in name or "\0" in name:
        raise InvalidInput("filename must be a plain file name (no folders), at most 255 characters")
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    if suffix and not _EXTENSION.match(suffix):
        raise InvalidInput(f"file name extension {suffix!r} is not valid")
    if options.task not in (stt_pb2.STT_TASK_UNSPECIFIED, stt_pb2.STT_TASK_TRANSCRIBE, stt_pb2.STT_TASK_TRANSLATE):
        raise InvalidInput(f"task {options.task} is unknown; use TRANSCRIBE or TRANSLATE")
    if options.language and not _LANGUAGE.match(options.language):
        raise InvalidInput(f"language {options.language!r} is not an ISO 639-1 code such as 'en' or 'de'")
    smoothing = options.smoothing
    if smoothing.HasField("min_span_s"):
        _range("smoothing.min_span_s", smoothing.min_span_s, 0, 3600)
    if smoothing.HasField("neutral_threshold"):
        _range("smoothing.neutral_threshold", smoothing.neutral_threshold, 0, 1)
    music = options.music
    if music.backend not in ("", "auto", "composer", "riffusion", "triton"):
        raise InvalidInput(f"unknown music backend {music.backend!r}; use composer, riffusion or triton")
    if music.HasField("tempo_bpm"):
        _range("music.tempo_bpm", music.tempo_bpm, 30, 240)
    if music.HasField("steps"):
        _range("music.steps", music.steps, 1, 200)
    if music.HasField("guidance"):
        _range("music.guidance", music.guidance, 0, 30)
    if music.HasField("denoising_strength"):
        _range("music.denoising_strength", music.denoising_strength, 0, 1, low_open=True)
    mix = options.mix
    for field, low, high in (("duck_db", 0, 60), ("loudness_lufs", -60, 0), ("true_peak_dbtp", -20, 0),
                             ("fade_in_s", 0, 60), ("fade_out_s", 0, 60), ("attack_ms", 1, 5000),
                             ("release_ms", 1, 10000), ("bgm_gain_db", -60, 20)):
        if mix.HasField(field):  # type: ignore[arg-type]
            _range(f"mix.{field}", getattr(mix, field), low, high)
    if options.separation_backend not in ("", "deepfilternet", "demucs"):
        raise InvalidInput(f"unknown separation backend {options.separation_backend!r}; use deepfilternet or demucs")
