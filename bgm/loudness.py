"""Integrated loudness (ITU-R BS.1770-4, as pyloudnorm measures it), fed in pieces.

Shared by the mixer (programme loudness) and the music service (each span's loudness).
The K-weighting filters are pyloudnorm's, made once per sample rate; the meter keeps only
the filter state and one energy sum per 100 ms step.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.signal import sosfilt

from bgm import vocab

ABSOLUTE_GATE = -70.0
SILENT = -120.0  # what silence (or too little audio) measures


@functools.cache
def k_weighting(rate: int) -> np.ndarray:
    """BS.1770's K-weighting at ``rate`` as second-order sections (pyloudnorm's coefficients)."""
    try:
        import pyloudnorm
    except ImportError as exc:  # pragma: no cover - an install without the extra
        raise RuntimeError("pyloudnorm is not installed (it comes with bgm[mixer] and bgm[music])") from exc

    stages = pyloudnorm.Meter(rate)._filters.values()
    return np.array([np.concatenate([f.b * f.passband_gain, f.a]) for f in stages])


class LoudnessMeter:
    """Gating blocks are 400 ms long and start every 100 ms, as BS.1770 prescribes."""

    def __init__(self, channels: int, rate: int = vocab.SEPARATION_RATE) -> None:
        self.sos = k_weighting(rate)
        self.rate = rate
        self.step = rate // 10
        self.state = np.zeros((self.sos.shape[0], channels, 2))
        self.sums: list[np.ndarray] = []  # per 100 ms step: energy summed over channels
        self.partial = np.zeros(0)
        self.samples = 0

    def feed(self, x: np.ndarray) -> None:
        if x.ndim == 1:
            x = x[:, None]
        # Channels first: filtering along contiguous memory is three times faster.
        filtered, self.state = sosfilt(self.sos, np.ascontiguousarray(x.T, dtype=np.float64), axis=-1,
                                       zi=self.state)
        energy = np.concatenate([self.partial, np.square(filtered).sum(axis=0)])
        whole = energy.shape[0] // self.step * self.step
        if whole:
            self.sums.append(energy[:whole].reshape(-1, self.step).sum(axis=1))
        self.partial = energy[whole:]
        self.samples += x.shape[0]

    def integrated(self) -> float:
        if self.samples < self.rate // 2:  # BS.1770 gating needs one 400 ms block: as ``loudness`` pads
            self.feed(np.zeros((self.rate // 2 - self.samples, self.state.shape[1]), dtype=np.float32))
        return gated_loudness(np.concatenate([*self.sums, [self.partial.sum()]]), self.samples, self.rate)


def joined_loudness(meters: Sequence[LoudnessMeter]) -> float:
    """The integrated loudness of the programme the meters measured one after another, each
    from a filter state of silence (each but the last fed whole 100 ms steps)."""
    if any(m.partial.size for m in meters[:-1]):
        raise ValueError("a meter before the last ended inside a 100 ms step")
    samples = sum(m.samples for m in meters)
    steps = np.concatenate([np.zeros(0), *(s for m in meters for s in m.sums), [meters[-1].partial.sum()]])
    return gated_loudness(steps, samples, meters[-1].rate)


def gated_loudness(steps: np.ndarray, samples: int, rate: int) -> float:
    """BS.1770's gated integrated loudness from K-weighted energy per 100 ms step (summed over
    channels) of a programme ``samples`` long."""
    step = rate // 10
    blocks = int(np.round((samples / rate - 0.4) / 0.1)) + 1
    if blocks < 1:
        return SILENT
    steps = np.pad(steps, (0, max(0, blocks + 3 - steps.shape[0])))
    z = (steps[:blocks] + steps[1 : blocks + 1] + steps[2 : blocks + 2] + steps[3 : blocks + 3]) / (4 * step)
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(z)
    gated = z[block_lufs >= ABSOLUTE_GATE]
    if gated.size == 0:
        return SILENT
    relative = -0.691 + 10 * np.log10(gated.mean()) - 10.0
    final = z[(block_lufs > relative) & (block_lufs > ABSOLUTE_GATE)]
    value = -0.691 + 10 * np.log10(final.mean()) if final.size else -np.inf
    return float(value) if np.isfinite(value) else SILENT


class StepEnergy:
    """K-weighted energy summed over channels per ``step`` samples (``step`` divides 100 ms),
    fed in pieces that are whole steps but the last. With a gain that is constant over each
    step, the loudness of the gained programme follows from these without filtering it again
    (``loudness_of_steps``)."""

    def __init__(self, channels: int, step: int, rate: int = vocab.SEPARATION_RATE) -> None:
        assert (rate // 10) % step == 0
        self.sos = k_weighting(rate)
        self.step, self.rate = step, rate
        self.state = np.zeros((self.sos.shape[0], channels, 2))

    def feed(self, x: np.ndarray) -> np.ndarray:
        out = []
        piece = 4 * self.rate  # a few seconds: temporaries stay small
        for start in range(0, x.shape[0], piece):
            filtered, self.state = sosfilt(self.sos, np.ascontiguousarray(x[start : start + piece].T,
                                                                          dtype=np.float64), axis=-1, zi=self.state)
            energy = np.square(filtered).sum(axis=0)
            whole = -(-energy.shape[0] // self.step) * self.step
            out.append(np.pad(energy, (0, whole - energy.shape[0])).reshape(-1, self.step).sum(axis=1))
        return np.concatenate(out) if out else np.zeros(0)


def energy_steps(x: np.ndarray, step: int, rate: int = vocab.SEPARATION_RATE) -> np.ndarray:
    """``StepEnergy`` of a whole programme ``x`` ((n, channels))."""
    return StepEnergy(x.shape[1], step, rate).feed(x)


def loudness_of_steps(energy: np.ndarray, step: int, samples: int, rate: int = vocab.SEPARATION_RATE) -> float:
    """Integrated loudness from ``energy_steps`` of a programme ``samples`` long."""
    per = (rate // 10) // step
    whole = -(-energy.shape[0] // per) * per
    steps = np.pad(energy, (0, whole - energy.shape[0])).reshape(-1, per).sum(axis=1)
    return gated_loudness(steps, max(samples, rate // 2), rate)  # as ``loudness`` pads a short programme


def loudness_of_blocks(blocks: Iterable[np.ndarray], channels: int, rate: int = vocab.SEPARATION_RATE) -> float:
    """``loudness`` of a programme fed in blocks ((m, channels) each)."""
    meter = LoudnessMeter(channels, rate)
    for block in blocks:
        meter.feed(block)
    return meter.integrated()


def loudness(x: np.ndarray, rate: int = vocab.SEPARATION_RATE) -> float:
    """Integrated loudness of ``x`` ((n,) or (n, channels)) in LUFS; ``SILENT`` for silence."""
    if x.shape[0] < rate // 2:  # BS.1770 gating needs at least one 400 ms block
        x = np.pad(x, ((0, rate // 2 - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
    meter = LoudnessMeter(x.shape[1] if x.ndim == 2 else 1, rate)
    # A few seconds at a time: small temporaries stay in cache and reuse the same memory.
    piece = 4 * rate
    for start in range(0, x.shape[0], piece):
        meter.feed(x[start : start + piece])
    return meter.integrated()
