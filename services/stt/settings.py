from __future__ import annotations

from dataclasses import dataclass

from bgm import vocab
from bgm.settings import check


@dataclass(frozen=True)
class SttSettings:
    """``BGM_STT_*``. Model names are faster-whisper sizes ("tiny.en", "small", "large-v3")
    or local CTranslate2 model directories; ``auto`` picks ``full_model`` on a GPU when its
    weights are present, else the bundled tiny.en."""

    model: str = vocab.AUTO
    # Used for translation, non-English speech and language detection.
    multilingual_model: str = vocab.AUTO
    # What "auto" picks on a GPU if its weights are available locally.
    full_model: str = "large-v3"
    device: str = vocab.AUTO
    # "" = int8 on CPU, float16 on GPU.
    compute_type: str = ""
    cpu_threads: int = 0
    beam_size: int = 5
    vad_filter: bool = True
    word_timestamps: bool = True
    # Detect the language with the multilingual model before using an English-only model.
    detect_language: bool = True

    def __post_init__(self) -> None:
        check(self.device in vocab.DEVICES, "BGM_STT_DEVICE", f"{self.device!r} is not {vocab.choices(vocab.DEVICES)}")
        check(1 <= self.beam_size <= 16, "BGM_STT_BEAM_SIZE", "must be 1..16")
        check(self.cpu_threads >= 0, "BGM_STT_CPU_THREADS", "must not be negative")
