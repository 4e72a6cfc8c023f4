from __future__ import annotations

from dataclasses import dataclass

from bgm import vocab
from bgm.settings import check


@dataclass(frozen=True)
class EmotionSettings:
    """``BGM_EMOTION_*``: backend and smoothing defaults (a request may override the latter)."""

    # goemotions (the shipped n-gram model: offline, default on CPU), nade, transformers, or
    # auto (transformers on a GPU when its weights are present, else goemotions).
    backend: str = vocab.AUTO
    # Hub name or local directory of a text-classification model.
    model: str = "j-hartmann/emotion-english-distilroberta-base"
    device: str = vocab.AUTO
    batch_size: int = 32
    min_span_s: float = 5.0
    weight_by_duration: bool = True
    weight_by_confidence: bool = False
    # A top score under this counts as neutral.
    neutral_threshold: float = 0.3
    max_text_chars: int = 2000
    max_segments: int = 20000

    def __post_init__(self) -> None:
        check(self.backend in (vocab.AUTO, *vocab.EMOTION_BACKENDS), "BGM_EMOTION_BACKEND",
              f"{self.backend!r} is not {vocab.choices((vocab.AUTO, *vocab.EMOTION_BACKENDS))}")
        check(self.device in vocab.DEVICES, "BGM_EMOTION_DEVICE", f"must be {vocab.choices(vocab.DEVICES)}")
        check(self.min_span_s >= 0, "BGM_EMOTION_MIN_SPAN_S", "must not be negative")
        check(0 <= self.neutral_threshold < 1, "BGM_EMOTION_NEUTRAL_THRESHOLD", "must be in [0, 1)")
        check(self.batch_size >= 1, "BGM_EMOTION_BATCH_SIZE", "must be at least 1")
