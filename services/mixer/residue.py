"""What separation leaves of the old music, pulled down further (the speech stays).

A separator keeps each time-frequency cell of the input at some gain g (its output over its
input): near 1 where it hears speech, lower where it hears something else. Under speech it
cannot go all the way down without hurting the words, so part of the old bed survives in
the cells it only half trusted (bench.quality: LibriSpeech's bed 18.5 dB under the speech).
This expander takes those cells further down: a cell kept at ``g < knee`` gets the extra
gain ``(g / knee) ** (power - 1)``; a cell at or above the knee (the speech) is untouched,
and ``power == 1`` changes nothing.

The bass gets its own, stronger power (``bass_power`` up to ``bass_hz``): what is left of
a bed under a voice is mostly its bass, where a bed has most of its energy and the separator
passes it at -5 to -11 dB (LibriSpeech: 80 % of the bed left under speech sat under
200 Hz), and there a voice has only its fundamental, which the separator keeps near 1.
Expanding the whole band also takes the consonants' half-kept cells and costs words.

It streams: the speech arrives in blocks, the output follows one frame behind, and the
frames overlap by half with square-root Hann windows, so with no expansion the speech comes
back sample for sample (to rounding).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from bgm import vocab
from bgm.audio import Recording

RATE = vocab.SEPARATION_RATE
# 20 ms at 48 kHz, the separator's own frame.
FRAME = 960


@dataclass(frozen=True)
class Expansion:
    """How far half-kept cells go down: ``power`` over the whole band, at least
    ``bass_power`` up to ``bass_hz``; cells kept at ``knee`` or more are untouched."""

    power: float = 1.0
    knee: float = 0.8
    bass_power: float = 1.0
    bass_hz: float = 0.0

    @property
    def changes_nothing(self) -> bool:
        return self.power == 1.0 and (self.bass_power == 1.0 or self.bass_hz <= 0.0)

    def exponents(self, frame: int, rate: int = RATE) -> np.ndarray:
        """``power - 1`` per rfft bin of a ``frame``-sample frame."""
        hz = np.arange(frame // 2 + 1) * rate / frame
        power = np.where(hz <= self.bass_hz, max(self.power, self.bass_power), self.power)
        return (power - 1.0).astype(np.float32)


def _window(n: int) -> np.ndarray:
    # Periodic Hann, square-rooted: analysis times synthesis sums to one at 50 % overlap.
    return np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def _frames(x: np.ndarray, count: int, n: int, hop: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(x, n)[: count * hop : hop]


def _stretch(x: Recording, start: int, length: int) -> np.ndarray:
    """``x[start:start + length]`` as float32, zeros where that runs off either end."""
    out = np.zeros(length, dtype=np.float32)
    lo, hi = max(0, start), min(x.shape[0], start + length)
    if hi > lo:
        out[lo - start : hi - start] = x[lo:hi]
    return out


# Up to this many bins to expand, they are computed alone (a matrix product: the five bins
# under 200 Hz cost a fraction of two whole FFTs a frame); more, and each frame is one FFT.
FEW_BINS = 32


class _FewBins:
    """The DFT of a frame at the given bins only, and back: ``expanded`` is the frame with
    those bins' gains applied, ``irfft(rfft(x) * extra)`` with ``extra`` 1 elsewhere."""

    def __init__(self, bins: np.ndarray, n: int) -> None:
        angle = 2 * np.pi * np.outer(np.arange(n), bins) / n
        self.cos = np.cos(angle).astype(np.float32)  # (n, bins)
        self.sin = np.sin(angle).astype(np.float32)
        # irfft's weights: DC (and Nyquist) once, every other bin twice (its mirror image).
        self.scale = (np.where((bins == 0) | (2 * bins == n), 1.0, 2.0) / n).astype(np.float32)

    def magnitude(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        real, imag = frames @ self.cos, -(frames @ self.sin)
        return real, imag, np.hypot(real, imag)

    def expanded(self, frames: np.ndarray, real: np.ndarray, imag: np.ndarray, extra: np.ndarray) -> np.ndarray:
        change = (extra - 1.0) * self.scale
        return frames + (real * change) @ self.cos.T - (imag * change) @ self.sin.T


def expand(mixture: Recording, kept: Iterable[np.ndarray], expansion: Expansion,
           frame: int = FRAME, few_bins: int = FEW_BINS) -> Iterator[np.ndarray]:
    """``kept`` (the separated speech of ``mixture``, in consecutive blocks) with the cells the
    separator only half kept pulled further down; yields blocks that together have
    ``mixture``'s length."""
    if expansion.changes_nothing:
        yield from kept
        return
    n, hop = frame, frame // 2
    total = mixture.shape[0]
    window = _window(n)
    exponents, knee = expansion.exponents(n), expansion.knee
    bins = np.flatnonzero(exponents > 0)
    few = _FewBins(bins, n) if bins.shape[0] <= few_bins else None
    exponents_at_bins = exponents[bins]
    # Both signals get ``hop`` zeros in front, so the first samples have two frames too; the
    # mixture is read a stretch at a time (a padded copy of an hour would be 0.7 GB).
    pending = np.zeros(hop, dtype=np.float32)  # kept speech from the next frame's start on
    at = 0  # where the next frame starts (padded)
    tail = np.zeros(hop, dtype=np.float32)  # the last frame's second half, still to overlap
    emitted = 0

    def run(count: int) -> np.ndarray:
        nonlocal pending, at, tail
        kept_frames = _frames(pending, count, n, hop) * window
        mix_frames = _frames(_stretch(mixture, at - hop, (count + 1) * hop), count, n, hop) * window
        if few is None:
            spec, mix = np.fft.rfft(kept_frames, axis=1), np.fft.rfft(mix_frames, axis=1)
            extra = np.minimum(1.0, np.abs(spec) / (np.abs(mix) + 1e-9) / knee) ** exponents
            out = (np.fft.irfft(spec * extra, n, axis=1) * window).astype(np.float32)
        else:
            real, imag, kept_size = few.magnitude(kept_frames)
            mix_size = few.magnitude(mix_frames)[2]
            extra = np.minimum(1.0, kept_size / (mix_size + 1e-9) / knee) ** exponents_at_bins
            out = (few.expanded(kept_frames, real, imag, extra) * window).astype(np.float32)
        done = np.empty(count * hop, dtype=np.float32)
        done[:hop] = tail + out[0, :hop]
        if count > 1:
            done[hop:] = (out[:-1, hop:] + out[1:, :hop]).reshape(-1)
        tail = out[-1, hop:].copy()
        pending = pending[count * hop :]
        at += count * hop
        return done

    def hand_out(done: np.ndarray) -> Iterator[np.ndarray]:
        nonlocal emitted
        # ``done`` starts at padded position ``at - len(done)``: the first hop is padding.
        start = at - done.shape[0] - hop
        piece = done[max(0, -start):]
        piece = piece[: total - emitted]
        if piece.shape[0]:
            emitted += piece.shape[0]
            yield piece

    for block in kept:
        pending = np.concatenate([pending, block.astype(np.float32, copy=False)])
        count = (pending.shape[0] - n) // hop + 1 if pending.shape[0] >= n else 0
        if count > 0:
            yield from hand_out(run(count))
    # The end: zeros after the speech until every input sample has had both its frames.
    while emitted < total:
        need = total + hop - at  # samples from ``at`` that still have to be finished
        count = -(-need // hop)
        short = max(0, (count + 1) * hop - pending.shape[0])
        pending = np.concatenate([pending, np.zeros(short, dtype=np.float32)])
        yield from hand_out(run(count))
