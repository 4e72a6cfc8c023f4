"""How long smoothing takes for long videos: the service's smoothing against the rules
applied pass after pass (the specification in tests/test_smoothing.py), same sentences,
same run.

    python -m bench.smoothing [--sentences 8000] [--reference-up-to 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from services.emotion.labels import EMOTIONS
from services.emotion.smoothing import Scored, smooth
from tests.test_smoothing import smooth_by_passes


def talk(count: int, seed: int = 3) -> tuple[list[Scored], float]:
    """Sentences of 0.5-4 s with pauses, emotions that flicker (half of them neutral)."""
    rng = np.random.default_rng(seed)
    items, t = [], 0.0
    for _ in range(count):
        length = float(rng.uniform(0.5, 4))
        emotion = int(rng.choice(len(EMOTIONS), p=[0.15, 0.1, 0.05, 0.1, 0.05, 0.05, 0.5]))
        p = rng.dirichlet(np.ones(len(EMOTIONS)))
        p[emotion] += 1
        items.append(Scored(t, t + length, emotion, p / p.sum(), weight=length))
        t += length + float(rng.uniform(0, 2))
    return items, t


def timed(fn, *args) -> tuple[float, object]:
    began = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - began, result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.smoothing")
    parser.add_argument("--sentences", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--reference-up-to", type=int, default=2000,
                        help="run the pass-after-pass specification up to this many sentences")
    args = parser.parse_args()
    print("| sentences | video (h) | spans | smoothing (s) | passes, as specified (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for count in args.sentences:
        items, duration = talk(count)
        fast_s, spans = timed(smooth, items, duration, 5.0)
        if count <= args.reference_up_to:
            spec_s, spec = timed(smooth_by_passes, items, duration, 5.0)
            assert [(s.start_s, s.end_s, s.emotion) for s in spans] == [  # type: ignore[attr-defined]
                (s.start_s, s.end_s, s.emotion) for s in spec]  # type: ignore[attr-defined]
            reference, ratio = f"{spec_s:.3f}", f"{spec_s / fast_s:.0f}x"
        else:
            reference, ratio = "-", "-"
        print(f"| {count} | {duration / 3600:.1f} | {len(spans)} | {fast_s:.3f} | {reference} | {ratio} |")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
