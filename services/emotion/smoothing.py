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

import heapq
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


class _Node:
    """A run in a doubly linked list, so that a change touches only its neighbours."""

    __slots__ = ("alive", "next", "prev", "run", "version")

    def __init__(self, run: Run) -> None:
        self.run = run
        self.prev: _Node | None = None
        self.next: _Node | None = None
        self.alive = True
        self.version = 0


class _Timeline:
    """The runs being smoothed: a linked list, and a heap of their durations (stale entries
    are skipped when they come up), so that finding the shortest run costs log n and each
    absorption re-examines only the runs next to it. For 8,000 sentences this takes about as
    long as the sort of the input; redoing every pass over all runs after each absorption
    (the rules as the docstring states them) grew with the square of the count."""

    def __init__(self, runs: list[Run], min_span_s: float) -> None:
        self.min_span_s = min_span_s
        self.nodes = [_Node(run) for run in runs]
        for left, right in itertools.pairwise(self.nodes):
            left.next, right.prev = right, left
        self.count = len(self.nodes)
        self.heap: list[tuple[float, float, int, int, _Node]] = []
        self._serial = itertools.count()
        for node in self.nodes:
            self._push(node)

    def _push(self, node: _Node) -> None:
        node.version += 1
        heapq.heappush(self.heap, (node.run.duration, node.run.start_s, next(self._serial), node.version, node))

    def _remove(self, node: _Node) -> None:
        node.alive = False
        if node.prev is not None:
            node.prev.next = node.next
        if node.next is not None:
            node.next.prev = node.prev
        self.count -= 1

    def _merge_into(self, keep: _Node, gone: _Node) -> None:
        keep.run.absorb(gone.run)
        self._remove(gone)

    def _merge_around(self, node: _Node) -> _Node:
        """Merge ``node`` with neighbours of its emotion (the left one keeps the run)."""
        while node.prev is not None and node.prev.run.emotion == node.run.emotion:
            left = node.prev
            self._merge_into(left, node)
            node = left
        while node.next is not None and node.next.run.emotion == node.run.emotion:
            self._merge_into(node, node.next)
        self._push(node)
        return node

    def _relabel(self, node: _Node) -> bool:
        """Brief neutral talk between (or beside) runs of one emotion takes that emotion."""
        run = node.run
        if run.emotion != NEUTRAL or self.count == 1 or run.duration >= 2 * self.min_span_s:
            return False
        left = node.prev.run.emotion if node.prev is not None else None
        right = node.next.run.emotion if node.next is not None else None
        if left is None or right is None or left == right:
            run.emotion = right if left is None else left  # type: ignore[assignment]
            return True
        return False

    def settle(self, node: _Node) -> None:
        """Apply the neutral rule and the merges around ``node`` until nothing near it changes."""
        todo = [node]
        while todo:
            current = todo.pop()
            if not current.alive:
                continue
            if self._relabel(current):
                current = self._merge_around(current)
                todo += [n for n in (current.prev, current.next) if n is not None]

    def shortest(self) -> _Node | None:
        while self.heap:
            _, _, _, version, node = self.heap[0]
            if node.alive and node.version == version:
                return node
            heapq.heappop(self.heap)
        return None

    def absorb_shortest(self) -> bool:
        """Absorb the shortest run under min_span_s (see the module docstring); False when none is."""
        short = self.shortest()
        if self.count < 2 or short is None or short.run.duration >= self.min_span_s:
            return False
        left, right = short.prev, short.next
        target: _Node | None
        if left is not None and right is not None and left.run.emotion == right.run.emotion:
            self._merge_into(left, short)
            self._merge_into(left, right)
            target = left
        else:
            if left is None or right is None:
                target = left or right
            else:
                mean = short.run.mean
                left_sim, right_sim = float(mean @ left.run.mean), float(mean @ right.run.mean)
                target = left if (left_sim, left.run.duration) >= (right_sim, right.run.duration) else right
            assert target is not None
            target.run.absorb(short.run)
            self._remove(short)
        assert target is not None
        target.run.emotion = int(np.argmax(target.run.mass))  # the label follows the evidence inside it
        target = self._merge_around(target)
        for node in (target, target.prev, target.next):
            if node is not None:
                self.settle(node)
        return True

    def runs(self) -> list[Run]:
        return [node.run for node in self.nodes if node.alive]


def smooth(items: Sequence[Scored], duration: float, min_span_s: float) -> list[Span]:
    """Spans covering [0, duration]; see the module docstring for the rules."""
    if duration <= 0:
        raise ValueError("duration must be positive")
    if not items:
        return [Span(0.0, duration, NEUTRAL, 1.0)]
    timeline = _Timeline(_merge_equal(_initial_runs(items, duration)), min_span_s)
    for node in list(timeline.nodes):
        timeline.settle(node)
    while timeline.absorb_shortest():
        pass
    runs = timeline.runs()
    runs[0].start_s, runs[-1].end_s = 0.0, duration
    return [Span(r.start_s, r.end_s, r.emotion, float(r.mean[r.emotion])) for r in runs]
