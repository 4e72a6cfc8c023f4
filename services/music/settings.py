from __future__ import annotations

from dataclasses import dataclass

from bgm.settings import check


@dataclass(frozen=True)
class MusicSettings:
    """``BGM_MUSIC_*``."""

    # "composer" (offline default) or "auto" (picks the composer until a Riffusion
    # pipeline is installed); "riffusion" and "triton" are reserved for the diffusion backends.
    backend: str = "auto"
    seed: int = 1234
    # Longest timeline one request may ask for.
    max_duration_s: float = 4 * 3600.0

    def __post_init__(self) -> None:
        check(self.backend in ("auto", "composer", "riffusion", "triton"), "BGM_MUSIC_BACKEND",
              f"{self.backend!r} is not auto, composer, riffusion or triton")
        check(self.max_duration_s > 0, "BGM_MUSIC_MAX_DURATION_S", "must be positive")
