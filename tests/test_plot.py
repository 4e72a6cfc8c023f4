"""The plot a person can read (#19): transcript lines never overlap the waveform or each other,
are never cut off, and spans carry their emotion and confidence.

Kept apart from the servers' tests: laying out a 10-minute plot holds the GIL long enough to
trip the event-loop guard of any server left running in the same module."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from bgm.v1 import common_pb2, gateway_pb2
from gateway import outputs
from gateway.example import make_example


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_example(tmp_path_factory.mktemp("plot") / "clip.mp4", section_s=8.0)


def transcript_of(duration: float, every: float, words: int = 12) -> gateway_pb2.Transcript:
    made = gateway_pb2.Transcript(duration_s=duration)
    t = 0.0
    while t + every <= duration:
        made.segments.add(text=" ".join(["wonderful"] * words) + f" at {t:.0f}", start_s=t, end_s=t + every)
        t += every
    return made


def timeline_of(duration: float, span_s: float) -> gateway_pb2.EmotionTimeline:
    made = gateway_pb2.EmotionTimeline()
    t, i = 0.0, 0
    while t < duration:
        made.spans.add(emotion=common_pb2.EMOTION_JOY + i % 7, confidence=0.5 + 0.05 * (i % 7),
                       span=common_pb2.TimeSpan(start_s=t, end_s=min(duration, t + span_s)))
        t += span_s
        i += 1
    return made


def check_readable(fig) -> None:
    labels_ax, wave_ax, text_ax = fig.axes
    renderer = fig.canvas.get_renderer()
    figure_box = fig.bbox
    for ax in (labels_ax, text_ax):
        boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
        assert boxes
        wave_box = wave_ax.get_window_extent(renderer)
        for i, box in enumerate(boxes):
            assert box.x0 >= figure_box.x0 - 1 and box.x1 <= figure_box.x1 + 1, "cut off at the edge"
            assert not box.overlaps(wave_box), "text over the waveform"
            for other in boxes[:i]:
                assert not box.overlaps(other), "texts overlap"


@pytest.mark.parametrize("duration, every, span_s", [(30.0, 2.5, 10.0), (600.0, 4.0, 5.0)])
def test_plot_lines_never_overlap_the_waveform_or_each_other(tmp_path, duration, every, span_s):
    import matplotlib.pyplot as plt

    fig = outputs.figure(tmp_path / "missing.mp4", transcript_of(duration, every), timeline_of(duration, span_s))
    try:
        check_readable(fig)
        labels = [t.get_text() for t in fig.axes[0].texts]
        assert "joy 0.50" in labels and len(labels) == len(timeline_of(duration, span_s).spans)
    finally:
        plt.close(fig)


def test_plot_of_the_example_is_readable_and_svg_works(video, tmp_path):
    import matplotlib.pyplot as plt

    words = transcript_of(24.0, 3.0)
    fig = outputs.figure(video, words, timeline_of(24.0, 8.0))
    try:
        check_readable(fig)
    finally:
        plt.close(fig)
    out = io.BytesIO()
    outputs.plot(out, video, words, timeline_of(24.0, 8.0), "svg")
    assert out.getvalue().lstrip().startswith(b"<?xml") and b"<svg" in out.getvalue()
