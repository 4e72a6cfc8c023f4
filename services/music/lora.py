"""LoRA adapters for the Riffusion UNet: what ``services.music.train`` writes and the music
service (and the Triton model) loads on top of the base model.

An adapter is a folder: ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format
(``load_lora_weights`` reads it, in bgm or any diffusers pipeline) and ``bgm_adapter.json``
with the base model, the training settings and the captions' vocabulary per emotion (the
mood and instruments most clips of that emotion were captioned with). Prompts for an
adapter are built from that vocabulary in the training captions' own form, so the words
the adapter learnt are the words it is asked with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgm import logs
from bgm.errors import Unsupported
from services.music.dataset import KEY_NAMES, caption
from services.music.styles import MAJOR, PROMPTS, STYLES

log = logs.get("bgm.music.lora")
WEIGHTS = "pytorch_lora_weights.safetensors"
INFO = "bgm_adapter.json"
ADAPTER_NAME = "bgm"


@dataclass(frozen=True)
class Vocabulary:
    mood: str = ""
    instruments: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    base: str
    rank: int
    alpha: float
    steps: int
    vocabulary: Mapping[str, Vocabulary] = field(default_factory=dict)

    def prompt(self, emotion: str, tempo: float | None = None) -> str:
        """The prompt for a span: a caption like the training ones, with the span's tempo and
        the key of the emotion's style; emotions the adapter never saw keep the base prompt."""
        words = self.vocabulary.get(emotion)
        if words is None:
            return PROMPTS[emotion]
        return caption(emotion, words.mood, tempo, style_key(emotion), words.instruments)

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "rank": self.rank, "alpha": self.alpha, "steps": self.steps,
                "vocabulary": {e: {"mood": v.mood, "instruments": list(v.instruments)}
                               for e, v in self.vocabulary.items()}}


def style_key(emotion: str) -> str:
    style = STYLES[emotion]
    return f"{KEY_NAMES[style.tonic % 12]} {'major' if style.mode == MAJOR else 'minor'}"


def read_info(path: str | Path) -> AdapterInfo:
    folder = Path(path)
    if not (folder / WEIGHTS).is_file():
        raise Unsupported(f"{folder} is not a LoRA adapter (no {WEIGHTS}); "
                          "train one with python -m services.music.train")
    info_path = folder / INFO
    if not info_path.is_file():  # an adapter trained elsewhere: weights only, base prompts
        return AdapterInfo(base="", rank=0, alpha=0.0, steps=0)
    try:
        data = json.loads(info_path.read_text(encoding="utf-8"))
        vocabulary = {e: Vocabulary(str(v.get("mood", "")), tuple(v.get("instruments", ())))
                      for e, v in data.get("vocabulary", {}).items() if e in PROMPTS}
        return AdapterInfo(str(data.get("base", "")), int(data.get("rank", 0)), float(data.get("alpha", 0.0)),
                           int(data.get("steps", 0)), vocabulary)
    except (ValueError, AttributeError, TypeError) as exc:
        raise Unsupported(f"{info_path} is not readable adapter information ({exc})") from exc


def apply(pipe: Any, path: str | Path, scale: float) -> AdapterInfo:
    """Loads the adapter into a diffusers pipeline at ``scale`` (0 = the base model alone)."""
    info = read_info(path)
    try:
        pipe.load_lora_weights(str(path), weight_name=WEIGHTS, adapter_name=ADAPTER_NAME)
    except ImportError as exc:
        raise Unsupported("loading a LoRA adapter needs peft (pip install 'bgm[music-full]')") from exc
    except (ValueError, RuntimeError, KeyError) as exc:
        base = f" (trained on {info.base})" if info.base else ""
        raise Unsupported(f"the LoRA adapter {path}{base} does not fit this model: {exc}") from exc
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
    log.info("LoRA adapter loaded", extra={"fields": {"adapter": str(path), "scale": scale, "rank": info.rank,
                                                      "emotions": sorted(info.vocabulary)}})
    return info
