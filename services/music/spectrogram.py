"""Audio to Riffusion's spectrogram images and back, with Riffusion's published parameters.

44.1 kHz mono; 10 ms hop, 100 ms Hann window, 400 ms zero-padded FFT; 512 mel bins (HTK,
unnormalised) from 0 to 10 kHz; amplitude to the power 0.25, scaled to 0..255 and inverted
(loud is dark), low frequencies at the bottom, as RGB. 512 px wide = 5.12 s. Phase is
recovered with Griffin-Lim (32 iterations, momentum 0.99).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SpectrogramParams:
    sample_rate: int = 44_100
    hop_length: int = 441
    win_length: int = 4_410
    n_fft: int = 17_640
    n_mels: int = 512
    f_min: float = 0.0
    f_max: float = 10_000.0
    power_for_image: float = 0.25
    griffin_lim_iters: int = 32
    width: int = 512

    @property
    def clip_seconds(self) -> float:
        return self.width * self.hop_length / self.sample_rate

    @property
    def clip_samples(self) -> int:
        return self.width * self.hop_length


PARAMS = SpectrogramParams()


@cache
def _mel_basis(p: SpectrogramParams) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=p.sample_rate, n_fft=p.n_fft, n_mels=p.n_mels, fmin=p.f_min, fmax=p.f_max,
                               htk=True, norm=None).astype(np.float32)


@cache
def _mel_sparse(p: SpectrogramParams) -> tuple[Any, Any, Any, np.ndarray]:
    """The mel basis as sparse matrices over the linear bins it covers (below f_max; each
    band spans a few bins), its transpose, the spread back (each band over its bins,
    weighted by its filter), and which bins those are. The inversion's products then cost
    the filters' few non-zeros, not the whole (n_mels x bins) matrix."""
    from scipy import sparse

    basis = _mel_basis(p)
    used = np.flatnonzero(basis.any(axis=0))
    covered = basis[:, used]
    spread = (covered / np.maximum(covered.sum(axis=0), 1e-8)[None, :]).T
    return (sparse.csr_matrix(covered), sparse.csr_matrix(covered.T), sparse.csr_matrix(spread.astype(np.float32)),
            used)


def mel_spectrogram(audio: np.ndarray, p: SpectrogramParams = PARAMS) -> np.ndarray:
    """Mono float audio -> mel amplitudes of shape (n_mels, frames)."""
    import librosa

    stft = librosa.stft(audio.astype(np.float32), n_fft=p.n_fft, hop_length=p.hop_length,
                        win_length=p.win_length, window="hann", center=True, pad_mode="reflect")
    return (_mel_basis(p) @ np.abs(stft)).astype(np.float32)


def image_from_spectrogram(mel: np.ndarray, p: SpectrogramParams = PARAMS) -> tuple[np.ndarray, float]:
    """Mel amplitudes -> (height, width, 3) uint8 image, and the amplitude that maps to black."""
    mel = mel[:, : p.width]
    max_value = float(mel.max()) or 1.0
    scaled = np.power(mel / max_value, p.power_for_image) * 255.0
    pixels = (255.0 - scaled).astype(np.uint8)[::-1]  # loud is dark; low frequencies at the bottom
    return np.repeat(pixels[:, :, None], 3, axis=2), max_value


def spectrogram_from_image(image: np.ndarray, max_value: float, p: SpectrogramParams = PARAMS) -> np.ndarray:
    """(height, width, 3 or 1) image, uint8 or float 0..255 -> mel amplitudes."""
    data = np.asarray(image, dtype=np.float32)
    if data.ndim == 3:
        data = data[:, :, 0]
    data = (255.0 - data[::-1]) / 255.0
    return np.power(np.clip(data, 0.0, 1.0), 1.0 / p.power_for_image) * max_value


def invert_mel(mel: np.ndarray, p: SpectrogramParams = PARAMS, iterations: int = 40) -> np.ndarray:
    """Non-negative linear magnitudes whose mel projection is ``mel``.

    Starts from each band spread over its bins, then multiplicative updates (as in NMF)
    solve mel = M @ S with S >= 0; the spread alone blurs neighbouring bands, which on real
    music cost a fifth of the log-mel correlation.
    """
    basis, basis_t, spread, used = _mel_sparse(p)
    mel = mel.astype(np.float32)
    covered = spread @ mel
    norm = np.maximum(basis_t @ np.ones_like(mel), 1e-9)
    for _ in range(iterations):
        covered *= (basis_t @ (mel / np.maximum(basis @ covered, 1e-9))) / norm
    linear = np.zeros((p.n_fft // 2 + 1, mel.shape[1]), dtype=np.float32)
    linear[used] = covered  # bins above f_max stay silent, as every mel band is there
    return linear


def audio_from_spectrogram(mel: np.ndarray, seed: int = 0, p: SpectrogramParams = PARAMS,
                           device: str = "") -> np.ndarray:
    """Mel amplitudes -> mono float audio (Griffin-Lim phase; deterministic for a seed and
    device). On a CUDA ``device`` the phase is recovered there (torch): on a CPU each clip
    takes about 10 s of FFTs either way, more than the diffusion itself on a GPU."""
    linear = invert_mel(mel, p)
    if device.startswith("cuda"):
        return griffin_lim_torch(linear, seed, p, device)
    import librosa

    audio = librosa.griffinlim(linear, n_iter=p.griffin_lim_iters, hop_length=p.hop_length,
                               win_length=p.win_length, n_fft=p.n_fft, window="hann", center=True,
                               momentum=0.99, init="random", random_state=seed)
    return audio.astype(np.float32)


def griffin_lim_torch(linear: np.ndarray, seed: int = 0, p: SpectrogramParams = PARAMS, device: str = "cpu",
                      momentum: float = 0.99) -> np.ndarray:
    """librosa's fast Griffin-Lim (random initial phase, momentum), with torch's transforms on
    ``device``; the same length as librosa's (frames - 1 hops)."""
    import torch

    magnitude = torch.from_numpy(np.ascontiguousarray(linear, dtype=np.float32)).to(device)
    generator = torch.Generator().manual_seed(seed)
    phase = (2 * np.pi * torch.rand(magnitude.shape, generator=generator)).to(device)
    angles = torch.polar(torch.ones_like(magnitude), phase)
    transform: dict[str, Any] = {"n_fft": p.n_fft, "hop_length": p.hop_length, "win_length": p.win_length,
                                 "window": torch.hann_window(p.win_length, device=device), "center": True}
    length = (magnitude.shape[1] - 1) * p.hop_length
    rebuilt = torch.zeros_like(angles)
    for _ in range(p.griffin_lim_iters):
        previous = rebuilt
        inverse = torch.istft(magnitude * angles, length=length, **transform)
        rebuilt = torch.stft(inverse, pad_mode="constant", return_complex=True, **transform)
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / (angles.abs() + 1e-16)
    return torch.istft(magnitude * angles, length=length, **transform).float().cpu().numpy()


def audio_to_image(audio: np.ndarray, p: SpectrogramParams = PARAMS) -> tuple[np.ndarray, float]:
    return image_from_spectrogram(mel_spectrogram(audio, p), p)


def image_to_audio(image: np.ndarray, max_value: float, seed: int = 0, p: SpectrogramParams = PARAMS,
                   device: str = "") -> np.ndarray:
    return audio_from_spectrogram(spectrogram_from_image(image, max_value, p), seed, p, device)


def log_mel_correlation(a: np.ndarray, b: np.ndarray, p: SpectrogramParams = PARAMS, floor_db: float = 80.0) -> float:
    """Pearson correlation of two signals' log-mel spectrograms (dB, floored ``floor_db`` under the peak)."""
    ma, mb = mel_spectrogram(a, p), mel_spectrogram(b, p)
    frames = min(ma.shape[1], mb.shape[1])
    da = 20 * np.log10(ma[:, :frames] + 1e-9)
    db = 20 * np.log10(mb[:, :frames] + 1e-9)
    top = max(da.max(), db.max())
    da, db = np.maximum(da, top - floor_db), np.maximum(db, top - floor_db)
    return float(np.corrcoef(da.ravel(), db.ravel())[0, 1])
