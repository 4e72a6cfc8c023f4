"""CPU time of the residue expander alone (no separator), per minute of 48 kHz audio: the
default bass setting computed at its bins alone and as whole FFTs, and the whole band.

    python -m bench.residue_speed [--minutes 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from services.mixer import residue
from services.mixer.settings import MixerSettings

RATE = residue.RATE
BLOCK = RATE * 4  # the blocks the separator hands on are seconds long


def seconds_for(mixture: np.ndarray, kept: np.ndarray, expansion: residue.Expansion, few_bins: int) -> float:
    blocks = (kept[i : i + BLOCK] for i in range(0, kept.shape[0], BLOCK))
    began = time.process_time()
    for _ in residue.expand(mixture, blocks, expansion, few_bins=few_bins):
        pass
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    mixture = (0.1 * rng.standard_normal(int(args.minutes * 60 * RATE))).astype(np.float32)
    kept = 0.5 * mixture
    default = MixerSettings().expansion
    cases = [("default (bass), its bins alone", default, residue.FEW_BINS),
             ("default (bass), whole FFTs", default, 0),
             ("whole band, power 2", residue.Expansion(2.0, 0.8), residue.FEW_BINS)]
    for name, expansion, few_bins in cases:
        cpu = seconds_for(mixture, kept, expansion, few_bins)
        print(f"{name:34s} {cpu / args.minutes:6.2f} s of CPU per minute (x real time {cpu / (args.minutes * 60):.4f})")


if __name__ == "__main__":
    main()
