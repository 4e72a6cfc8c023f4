"""Per-step arrays of a long programme kept on disk, not in memory.

The levelling keeps the K-weighted energy, the peak envelope and the limiter's gain per step
of 8 samples: 6,000 values a second, 86 MB an hour each as float32 (43 MB kept coarse).
They are written once, in order, and read back a chunk at a time (the search for the
levelling gain reads them a dozen times; rendering reads the gain around each block), so
on disk they cost a read from the page cache, and memory stays flat however long the
programme.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

# What a coarse file adds to the float32 bits before it drops the low 16: half of what is
# dropped (to the nearest; None: ties to even) or all of it (up: for values that must never
# read low, such as the peaks a limiter is set by).
ROUNDING: dict[str, int | None] = {"nearest": None, "up": 0xFFFF}


class StepFile:
    """A float32 array appended in order and read back by range, from any thread. The file
    has no name (it is gone when closed or when the process ends, whatever happens).

    ``coarse`` ("nearest" or "up", see ROUNDING) keeps only the top 16 bits of each value
    (bfloat16: float32's range, 8 significant bits: within 0.4 % rounded to the nearest,
    0.8 % or 0.07 dB rounded up), in half the disk: the energy and envelope the levelling
    searches over do not need more."""

    def __init__(self, folder: str | None = None, coarse: str = "") -> None:
        if coarse and coarse not in ROUNDING:
            raise ValueError(f"coarse is one of {sorted(ROUNDING)}")
        self._file = tempfile.TemporaryFile(dir=folder or None, prefix="bgm-steps-")  # noqa: SIM115 - lives as long as this object
        self.coarse = coarse
        self.item = 2 if coarse else 4
        self.length = 0

    def append(self, values: np.ndarray) -> None:
        floats = np.ascontiguousarray(values, dtype="<f4")
        if self.coarse:
            bits = floats.view("<u4").astype(np.uint64)
            up = ROUNDING[self.coarse]
            bits += (0x7FFF + ((bits >> 16) & 1)) if up is None else up
            self._file.write(np.minimum(bits >> 16, 0xFFFF).astype("<u2").tobytes())
        else:
            self._file.write(floats.tobytes())
        self.length += values.shape[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Values [lo, hi), clipped to what was written."""
        lo, hi = max(0, lo), min(self.length, hi)
        if hi <= lo:
            return np.zeros(0, dtype=np.float32)
        self._file.flush()
        data = os.pread(self._file.fileno(), (hi - lo) * self.item, lo * self.item)
        if self.coarse:
            return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(data, dtype="<f4").astype(np.float32)

    def close(self) -> None:
        self._file.close()
