"""Valid ranges of request options, shared by the services that apply them and the gateway
that checks them before any work starts."""

from __future__ import annotations

import math
import re

from bgm.errors import InvalidInput

MIX_RANGES: dict[str, tuple[float, float]] = {
    "duck_db": (0, 60),
    "loudness_lufs": (-60, 0),
    "true_peak_dbtp": (-20, 0),
    "fade_in_s": (0, 60),
    "fade_out_s": (0, 60),
    "attack_ms": (1, 5000),
    "release_ms": (1, 10000),
    "bgm_gain_db": (-60, 20),
    "duck_sensitivity": (0, 1),
    "hold_ms": (0, 5000),
    "duck_wide_db": (0, 60),
}
# A container's extension, as far as one is used: ".mp4", ".webm".
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,6}$")


def file_suffix(name: str, field: str = "filename") -> str:
    """The extension of a client-given file name ("" where it has none), or InvalidInput where
    the name is not a plain file name. "Dr. Who interview" has no extension: the container is
    found by probing the bytes, the name only picks the output's container where it can."""
    if len(name) > 255 or "/" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"{field} must be a plain file name (no folders or control characters), "
                           "at most 255 characters")
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    return suffix if _EXTENSION.match(suffix) else ""


# ISO 639-1 (or 639-2) language codes, lower case: "en", "de", "haw".
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")
TEMPO_BPM = (30.0, 240.0)
DIFFUSION_STEPS = (1, 200)
GUIDANCE = (0.0, 30.0)
# Denoising strength is in (0, 1]: zero would leave the seed image unchanged.
DENOISING_STRENGTH = (0.0, 1.0)


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    """``value`` if it lies in [low, high] (or (low, high]); else InvalidInput naming it."""
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bracket = "(" if low_open else "["
        raise InvalidInput(f"{name} {value:g} is out of range {bracket}{low:g}, {high:g}]")
    return value
