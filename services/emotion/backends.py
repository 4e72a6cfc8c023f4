"""Emotion classifiers behind one interface: texts in, (n, 7) probabilities out.

Column order is ``labels.EMOTIONS``. ``goemotions`` is the offline default: a linear n-gram
model trained on GoEmotions and shipped in this repository (``services/emotion/linear.py``);
``nade`` is a fastText + LightGBM model shipped on PyPI (8 Plutchik emotions mapped to our
7); ``transformers`` loads any text-classification model whose labels name our emotions, by
default j-hartmann/emotion-english-distilroberta-base.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from bgm import logs, models, vocab
from services.emotion.labels import EMOTIONS, NEUTRAL
from services.emotion.settings import EmotionSettings

log = logs.get("bgm.emotion")


class EmotionBackend(Protocol):
    name: str

    def classify(self, texts: list[str], neutral_threshold: float) -> np.ndarray: ...


class GoEmotionsBackend:
    """Calibrated probabilities from the shipped n-gram model; a top probability under
    ``neutral_threshold`` also gives neutral its due, as the other backends do."""

    name = vocab.EMOTION_GOEMOTIONS

    def __init__(self) -> None:
        from services.emotion.linear import LinearModel

        self.model = LinearModel()

    def classify(self, texts: list[str], neutral_threshold: float) -> np.ndarray:
        probs = self.model.probabilities(texts)
        unsure = probs.max(axis=1) < neutral_threshold
        probs[unsure, NEUTRAL] = np.maximum(probs[unsure, NEUTRAL], probs[unsure].max(axis=1) + 1e-3)
        return probs / probs.sum(axis=1, keepdims=True)


class NadeBackend:
    """nade's eight independent scores mapped to our seven classes.

    anticipation and trust have no class of ours and fold into neutral, as does any text
    whose strongest emotion scores under ``neutral_threshold``.
    """

    name = vocab.EMOTION_NADE

    def __init__(self) -> None:
        import nade
        from nade import Nade

        data = models.nade_data()
        # Nade reads '<package>/data/<model>'; a relative model name points it at our
        # unpacked, writable copy, so the installed package is never written to.
        package_data = Path(nade.__file__).parent / "data"
        self.model = Nade(model=os.path.relpath(data, package_data))

    def classify(self, texts: list[str], neutral_threshold: float) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(EMOTIONS)), dtype=np.float32)
        # nade's preprocessing lower-cases and splits punctuation; empty text is undefined.
        safe = [t if t.strip() else "." for t in texts]
        raw = self.model.predict(safe)
        scores = {label: np.asarray(values.to_pylist(), dtype=np.float32) for label, values in raw.items()}
        table = np.stack([scores[e] for e in EMOTIONS[:NEUTRAL]], axis=1)
        top = table.max(axis=1)
        neutral = np.maximum.reduce([scores["anticipation"], scores["trust"],
                                     np.where(top < neutral_threshold, neutral_threshold, 0.0)])
        table = (np.concatenate([table, neutral[:, None]], axis=1) + 1e-6).astype(np.float32)
        return (table / table.sum(axis=1, keepdims=True)).astype(np.float32)


class TransformersBackend:
    """A Hugging Face text-classification model, loaded by hub name or local directory."""

    name = vocab.EMOTION_TRANSFORMERS

    def __init__(self, model: str, device: str, batch_size: int) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = models.torch_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(model).to(self.device).eval()
        self.batch_size = batch_size
        self.columns = self._label_columns(self.model.config.id2label)
        log.info("emotion model loaded", extra={"fields": {"model": model, "device": self.device}})

    @staticmethod
    def _label_columns(id2label: dict[int, str]) -> list[int]:
        """For each of our emotions, the model's output index; every one must be present."""
        by_name = {str(label).strip().lower(): int(i) for i, label in id2label.items()}
        missing = [e for e in EMOTIONS if e not in by_name]
        if missing:
            raise models.ModelNotFound(
                f"the emotion model's labels {sorted(by_name)} lack {missing}; it needs all of {list(EMOTIONS)}"
            )
        return [by_name[e] for e in EMOTIONS]

    def classify(self, texts: list[str], neutral_threshold: float) -> np.ndarray:
        """Softmax over the model's labels; a top probability under the threshold becomes neutral."""
        out = []
        with self.torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                       max_length=512, return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits.float()
                ours = self.torch.softmax(logits, dim=-1)[:, self.columns]
                out.append((ours / ours.sum(dim=-1, keepdim=True)).cpu().numpy())
        if not out:
            return np.zeros((0, len(EMOTIONS)), dtype=np.float32)
        probs: np.ndarray = np.concatenate(out)
        unsure = probs.max(axis=1) < neutral_threshold
        probs[unsure, NEUTRAL] = np.maximum(probs[unsure, NEUTRAL], probs[unsure].max(axis=1) + 1e-3)
        return probs / probs.sum(axis=1, keepdims=True)


def _transformers_usable(settings: EmotionSettings) -> bool:
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    if Path(settings.model).is_dir():
        return True
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(settings.model, local_files_only=True)
        return True
    except Exception:
        return False


# Name -> factory, as in the music service's backends.py (and diffusers' pipeline registry).
REGISTRY: dict[str, Callable[[EmotionSettings], EmotionBackend]] = {
    vocab.EMOTION_GOEMOTIONS: lambda settings: GoEmotionsBackend(),
    vocab.EMOTION_NADE: lambda settings: NadeBackend(),
    vocab.EMOTION_TRANSFORMERS: lambda s: TransformersBackend(s.model, s.device, s.batch_size),
}


def create(settings: EmotionSettings) -> EmotionBackend:
    """The configured backend; ``auto``: the full model where a GPU and its weights are present."""
    choice = settings.backend
    if choice == vocab.AUTO:
        choice = vocab.EMOTION_TRANSFORMERS if _transformers_usable(settings) else vocab.EMOTION_GOEMOTIONS
    return REGISTRY[choice](settings)
