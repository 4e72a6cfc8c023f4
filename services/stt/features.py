"""Whisper's log-Mel spectrogram, computed 15 s at a time.

faster-whisper computes the spectrogram of all the audio it is given at once, and its
intermediates (every 25 ms frame windowed, then its spectrum) cost about 0.7 MB per second:
200 MB for one 5-minute window, on top of the model. ``PiecewiseFeatures`` gives the same
bits with a tenth of that: each frame's spectrum depends on its own samples only, so the
spectra are made a piece at a time, and only their power (4 bytes a value) is kept whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PIECE_FRAMES = 1500  # 15 s of 10 ms frames: about 15 MB of intermediates


class PiecewiseFeatures:
    """Stands in for a ``faster_whisper.feature_extractor.FeatureExtractor`` (every attribute
    is the wrapped one's); only the call is made piecewise."""

    def __init__(self, inner: Any, piece_frames: int = PIECE_FRAMES) -> None:
        self.__dict__.update(inner=inner, piece_frames=piece_frames)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    def __call__(self, waveform: np.ndarray, padding: int = 160, chunk_length: int | None = None) -> np.ndarray:
        inner = self.inner
        if chunk_length is not None:  # as FeatureExtractor.__call__ does
            inner.n_samples = chunk_length * inner.sampling_rate
            inner.nb_max_frames = inner.n_samples // inner.hop_length
        samples = np.asarray(waveform, dtype=np.float32)
        if padding:
            samples = np.pad(samples, (0, padding))
        n_fft, hop = inner.n_fft, inner.hop_length
        padded = np.pad(samples, n_fft // 2, mode="reflect")  # stft(center=True)
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
        count = frames.shape[0] - 1  # faster-whisper drops the last frame
        window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
        # Frame by frequency, filled a piece at a time; its transpose is laid out as
        # faster-whisper's, so the one product with the filters below gives its exact bits.
        power = np.empty((max(0, count), n_fft // 2 + 1), dtype=np.float32)
        for lo in range(0, count, self.piece_frames):
            hi = min(count, lo + self.piece_frames)
            spectrum = np.fft.rfft(frames[lo:hi] * window, n=n_fft, axis=-1).astype(np.complex64)
            power[lo:hi] = np.abs(spectrum) ** 2
        out = np.log10(np.clip(inner.mel_filters @ power.T, a_min=1e-10, a_max=None))
        del power
        if out.size:
            np.maximum(out, out.max() - 8.0, out=out)
        out += 4.0
        out /= 4.0
        return out
