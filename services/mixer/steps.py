"""Per-step arrays of a long programme kept on disk, not in memory.

The levelling keeps the K-weighted energy, the peak envelope and the limiter's gain per step
of 8 samples: 6,000 values a second, 86 MB an hour each as float32. They are written once,
in order, and read back a chunk at a time (the search for the levelling gain reads them a
dozen times; rendering reads the gain around each block), so on disk they cost a read
from the page cache, and memory stays flat however long the programme.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

ITEM = 4  # float32


class StepFile:
    """A float32 array appended in order and read back by range, from any thread. The file
    has no name (it is gone when closed or when the process ends, whatever happens)."""

    def __init__(self, folder: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=folder or None, prefix="bgm-steps-")  # noqa: SIM115 - lives as long as this object
        self.length = 0

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype="<f4").tobytes())
        self.length += values.shape[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Values [lo, hi), clipped to what was written."""
        lo, hi = max(0, lo), min(self.length, hi)
        if hi <= lo:
            return np.zeros(0, dtype=np.float32)
        self._file.flush()
        data = os.pread(self._file.fileno(), (hi - lo) * ITEM, lo * ITEM)
        return np.frombuffer(data, dtype="<f4").astype(np.float32)

    def close(self) -> None:
        self._file.close()
