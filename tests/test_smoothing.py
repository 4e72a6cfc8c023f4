"""Smoothing invariants, proven over random segment lists, and the design's worked examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.emotion.labels import EMOTIONS, NEUTRAL
from services.emotion.smoothing import LEAD_S, Run, Scored, Span, _initial_runs, _merge_equal, smooth

JOY, SADNESS, ANGER = EMOTIONS.index("joy"), EMOTIONS.index("sadness"), EMOTIONS.index("anger")


def probs(emotion: int, strength: float = 0.7) -> np.ndarray:
    p = np.full(len(EMOTIONS), (1 - strength) / (len(EMOTIONS) - 1))
    p[emotion] = strength
    return p


def seg(start: float, end: float, emotion: int) -> Scored:
    return Scored(start, end, emotion, probs(emotion), weight=max(end - start, 0.05))


@st.composite
def timelines(draw):
    n = draw(st.integers(0, 25))
    t = draw(st.floats(0, 5))
    items = []
    for _ in range(n):
        t += draw(st.floats(-0.5, 4))  # small overlaps happen too
        t = max(t, 0.0)
        length = draw(st.floats(0, 12))
        emotion = draw(st.integers(0, len(EMOTIONS) - 1))
        weights = np.asarray(draw(st.lists(st.floats(0.01, 1), min_size=7, max_size=7)))
        p = weights / weights.sum()
        p[emotion] += 1.0  # the chosen emotion leads
        items.append(Scored(t, t + length, emotion, p / p.sum(), weight=draw(st.floats(0.05, 10))))
        t += length
    tail = draw(st.floats(0, 10))
    duration = max(t + tail, 0.5)
    min_span = draw(st.floats(0, 12))
    return items, duration, min_span


def check_invariants(spans: list[Span], duration: float, min_span: float) -> None:
    assert spans[0].start_s == 0.0
    assert spans[-1].end_s == duration
    for a, b in itertools.pairwise(spans):
        assert a.end_s == b.start_s  # no holes, no overlaps
        assert a.emotion != b.emotion  # neighbours differ
    for s in spans:
        assert s.end_s > s.start_s  # sorted, non-empty
        if len(spans) > 1:
            assert s.end_s - s.start_s >= min_span - 1e-9
        assert 0 <= s.emotion < len(EMOTIONS)


# ----- the rules as the module docstring states them, pass after pass ----------------------
# The service's version keeps a linked list and a heap so that each change costs log n; this
# one redoes every pass over all runs after each absorption (quadratic), and is the
# specification the fast one must match exactly.
def _relabel_neutral(runs: list[Run], min_span_s: float) -> bool:
    changed = False
    for i, run in enumerate(runs):
        if run.emotion != NEUTRAL or len(runs) == 1 or run.duration >= 2 * min_span_s:
            continue
        left = runs[i - 1].emotion if i > 0 else None
        right = runs[i + 1].emotion if i + 1 < len(runs) else None
        if left is None or right is None or left == right:
            kept = right if left is None else left
            assert kept is not None  # a run has a neighbour unless it is the only one
            run.emotion = kept
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
        assert target is not None  # more than one run: one side exists
    else:
        mean = short.mean
        left_sim, right_sim = float(mean @ left.mean), float(mean @ right.mean)
        target = left if (left_sim, left.duration) >= (right_sim, right.duration) else right
    target.absorb(short)
    target.emotion = int(np.argmax(target.mass))
    runs.remove(short)
    return True


def smooth_by_passes(items, duration: float, min_span_s: float) -> list[Span]:
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


@settings(max_examples=400, deadline=None)
@given(timelines())
def test_the_fast_smoothing_gives_exactly_what_the_rules_say(case):
    items, duration, min_span = case
    fast, spec = smooth(items, duration, min_span), smooth_by_passes(items, duration, min_span)
    assert [(s.start_s, s.end_s, s.emotion) for s in fast] == [(s.start_s, s.end_s, s.emotion) for s in spec]
    assert [s.confidence for s in fast] == pytest.approx([s.confidence for s in spec])


def test_smoothing_an_hour_of_sentences_matches_the_rules():
    from bench.smoothing import talk

    items, duration = talk(1500)  # about an hour of talk, with emotions that flicker
    fast, spec = smooth(items, duration, 5.0), smooth_by_passes(items, duration, 5.0)
    assert [(s.start_s, s.end_s, s.emotion) for s in fast] == [(s.start_s, s.end_s, s.emotion) for s in spec]


@settings(max_examples=400, deadline=None)
@given(timelines())
def test_smoothing_invariants_and_idempotence(case):
    items, duration, min_span = case
    spans = smooth(items, duration, min_span)
    check_invariants(spans, duration, min_span)
    again = smooth([Scored(s.start_s, s.end_s, s.emotion, probs(s.emotion)) for s in spans], duration, min_span)
    assert [(s.start_s, s.end_s, s.emotion) for s in again] == [(s.start_s, s.end_s, s.emotion) for s in spans]


def test_a_short_change_between_agreeing_neighbours_is_joined_across():
    spans = smooth([seg(0, 10, JOY), seg(10, 12, SADNESS), seg(12, 22, JOY)], 22, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(JOY, 0.0, 22)]


def test_a_short_change_between_different_neighbours_gives_two_spans():
    spans = smooth([seg(0, 10, JOY), seg(10, 12, SADNESS), seg(12, 22, ANGER)], 22, 5)
    assert [s.emotion for s in spans] == [JOY, ANGER]
    assert spans[0].start_s == 0 and spans[-1].end_s == 22 and spans[0].end_s == spans[1].start_s


def test_short_span_joins_the_most_similar_neighbour():
    sad_leaning_joy = Scored(10, 12, ANGER, np.array([0.1, 0.35, 0.0, 0.45, 0.0, 0.05, 0.05]), 2)
    spans = smooth([seg(0, 10, JOY), sad_leaning_joy, seg(12, 22, SADNESS)], 22, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(JOY, 0.0, 10), (SADNESS, 10, 22)]


def test_a_trailing_change_after_the_last_long_span_is_kept():
    spans = smooth([seg(0, 10, JOY), seg(10, 20, SADNESS), seg(20, 26, ANGER)], 30, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(JOY, 0, 10), (SADNESS, 10, 20), (ANGER, 20, 30)]


def test_a_change_lands_with_the_next_sentence_and_times_are_exact():
    spans = smooth([seg(1.25, 9.5, JOY), seg(12.5, 20.75, SADNESS)], 23.1, 5)
    assert [(s.start_s, s.end_s) for s in spans] == [(0.0, 12.5 - LEAD_S), (12.5 - LEAD_S, 23.1)]


def test_a_long_silence_keeps_the_mood_until_the_next_line():
    """Worked example: 57 s of silence before an angry line; the anger starts with the line
    (LEAD_S before it), not 28.5 s early at the silence's midpoint."""
    spans = smooth([seg(0, 5, JOY), seg(62, 67, ANGER)], 70, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(JOY, 0.0, 62 - LEAD_S), (ANGER, 62 - LEAD_S, 70)]


def test_brief_neutral_talk_does_not_break_the_mood_around_it():
    spans = smooth([seg(0, 10, JOY), seg(10, 16, NEUTRAL), seg(16, 26, JOY)], 26, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(JOY, 0.0, 26)]
    spans = smooth([seg(0, 8, NEUTRAL), seg(8, 20, SADNESS)], 20, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(SADNESS, 0.0, 20)]


def test_a_long_neutral_stretch_stays_neutral():
    """Worked examples: a 60 s neutral intro before 5 s of joy, a 90 s neutral outro after anger."""
    spans = smooth([seg(0, 60, NEUTRAL), seg(60, 65, JOY)], 65, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(NEUTRAL, 0.0, 60), (JOY, 60, 65)]
    spans = smooth([seg(0, 10, ANGER), seg(10, 100, NEUTRAL)], 100, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(ANGER, 0.0, 10), (NEUTRAL, 10, 100)]
    spans = smooth([seg(0, 10, JOY), seg(10, 20, NEUTRAL), seg(20, 30, JOY)], 30, 5)
    assert [s.emotion for s in spans] == [JOY, NEUTRAL, JOY]  # 10 s is twice the minimum span


def test_a_span_follows_the_evidence_it_absorbs():
    """Worked example: two joyful sentences (joy 0.75, then joy 0.39 / neutral 0.44) open the
    video. The weaker one is labelled neutral; the short joyful run is absorbed into it, and
    the merged run, mostly joy by its mass, is joy: not neutral, nor the far neighbour's sadness."""
    weak = np.array([0.39, 0.03, 0.03, 0.03, 0.04, 0.04, 0.44])
    items = [Scored(0, 4, JOY, probs(JOY, 0.75), 4), Scored(4, 10, NEUTRAL, weak, 6),
             seg(10, 30, SADNESS)]
    spans = smooth(items, 30, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(JOY, 0.0, 10), (SADNESS, 10, 30)]


def test_no_speech_is_one_neutral_span():
    assert [(s.emotion, s.start_s, s.end_s) for s in smooth([], 42.0, 5)] == [(NEUTRAL, 0.0, 42.0)]


def test_everything_neutral_stays_neutral():
    spans = smooth([seg(0, 5, NEUTRAL), seg(6, 12, NEUTRAL)], 12, 5)
    assert [(s.emotion, s.start_s, s.end_s) for s in spans] == [(NEUTRAL, 0.0, 12)]


def test_whole_duration_shorter_than_min_span_is_one_span():
    spans = smooth([seg(0, 1, JOY), seg(1, 2, ANGER), seg(2, 3, JOY)], 3, 5)
    assert len(spans) == 1 and spans[0].end_s == 3


def test_zero_duration_is_refused():
    with pytest.raises(ValueError):
        smooth([], 0.0, 5)
