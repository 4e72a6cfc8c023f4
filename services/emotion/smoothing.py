"""Turning per-sentence emotions into a stable timeline of spans.

Works on exact float times. The result covers [0, duration] with no holes or overlaps:
the silence between two sentences belongs to the earlier one up to ``LEAD_S`` before the
next sentence starts (the music changes with the words, not halfway through a pause), the
first span starts at 0 and the last ends at ``duration``. Then, until nothing changes:
- neighbours with the same emotion merge;
- a neutral run shorter than twice ``min_span_s`` between two runs of the same emotion, or
  at either end, takes that emotion (brief neutral talk should not break the mood around
  it; a long neutral stretch is neutral);
- the shortest run under ``min_span_s`` is absorbed: across it if its neighbours agree,
  else into the neighbour whose mean probabilities are most like its own; the run that
  absorbs it is labelled anew by the evidence it now holds (the emotion with the most
  weighted probability mass).
The output is a fixed point: smoothing it again changes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.emotion.labels import NEUTRAL

# How far before a sentence its emotion may start, when silence precedes it (seconds).
LEAD_S = 1.0


@dataclass(frozen=True)
class Scored:
    """One classified sentence: times, chosen emotion (index), probabilities, weight."""

    start_s: float
    end_s: float
    emotion: int
    probabilities: np.ndarray
    weight: float = 1.0


@dataclass
class Run:
    start_s: float
    end_s: float
    emotion: int
    mass: np.ndarray  # weighted sum of probability vectors
    weight: float

    @property
    def duration(self) -> float:
        return self.end_s - self.start_s

    @property
    def mean(self) -> np.ndarray:
        return self.mass / self.weight if self.weight > 0 else self.mass

    def absorb(self, other: Run) -> None:
        self.start_s = min(self.start_s, other.start_s)
        self.end_s = max(self.end_s, other.end_s)
        self.mass = self.mass + other.mass
        self.weight += other.weight


@dataclass(frozen=True)
class Span:
    start_s: float
    end_s: float
    emotion: int
    confidence: float


def _initial_runs(items: Sequence[Scored], duration: float) -> list[Run]:
    ordered = sorted(items, key=lambda s: (s.start_s, s.end_s))
    cuts = [0.0]
    for prev, nxt in itertools.pairwise(ordered):
        end, start = min(prev.end_s, duration), min(nxt.start_s, duration)
        cut = max(end, start - LEAD_S) if start > end else (end + start) / 2  # overlaps: the middle
        cuts.append(min(max(cut, cuts[-1]), duration))
    cuts.append(duration)
    runs = []
    for i, item in enumerate(ordered):
        probs = np.asarray(item.probabilities, dtype=np.float64)
        runs.append(Run(cuts[i], cuts[i + 1], item.emotion, probs * item.weight, item.weight))
    return runs


def _merge_equal(runs: list[Run]) -> list[Run]:
    merged: list[Run] = []
    for run in runs:
        if merged and (merged[-1].emotion == run.emotion or run.duration <= 0):
            merged[-1].absorb(run)
        elif merged and merged[-1].duration <= 0:
            run.absorb(merged[-1])
            merged[-1] = run
        else:
            merged.append(run)
    return merged


def _relabel_neutral(runs: list[Run], min_span_s: float) -> bool:
    changed = False
    for i, run in enumerate(runs):
        if run.emotion != NEUTRAL or len(runs) == 1 or run.duration >= 2 * min_span_s:
            continue
        left = runs[i - 1].emotion if i > 0 else None
        right = runs[i + 1].emotion if i + 1 < len(runs) else None
        if left is None or right is None or left == right:
            run.emotion = right if left is None else left  # type: ignore[assignment]
            changed = True
    return changed


def _absorb_shortest(runs: list[Run], min_span_s: float) -> bool:
    if len(runs) < 2:
        return False
    i = min(range(len(runs)), key=lambda k: (runs[k].duration, k))
    short = runs[i]
    if short.duration >= min_span_s:
        return False
    left = runs[i - 1] if i > 0 else None
    right = runs[i + 1] if i + 1 < len(runs) else None
    if left is not None and right is not None and left.emotion == right.emotion:
        left.absorb(short)
        left.absorb(right)
        left.emotion = int(np.argmax(left.mass))
        del runs[i : i + 2]
        return True
    if left is None or right is None:
        target = left or right
    else:
        mean = short.mean
        left_sim, right_sim = float(mean @ left.mean), float(mean @ right.mean)
        target = left if (left_sim, left.duration) >= (right_sim, right.duration) else right
    assert target is not None
    target.absorb(short)
    target.emotion = int(np.argmax(target.mass))  # the label follows the evidence inside it
    runs.remove(short)
    return True


def smooth(items: Sequence[Scored], duration: float, min_span_s: float) -> list[Span]:
    """Spans covering [0, duration]; see the module docstring for the rules."""
    if duration <= 0:
        raise ValueError("duration must be positive")
    if not items:
        return [Span(0.0, duration, NEUTRAL, 1.0)]
    runs = _merge_equal(_initial_runs(items, duration))
    while True:
        changed = _relabel_neutral(runs, min_span_s)
        runs = _merge_equal(runs)
        if _absorb_shortest(runs, min_span_s):
            changed = True
            runs = _merge_equal(runs)
        if not changed:
            break
    runs[0].start_s, runs[-1].end_s = 0.0, duration
    return [Span(r.start_s, r.end_s, r.emotion, float(r.mean[r.emotion])) for r in runs]
