"""Files a person wants beside the remixed video: subtitles, the timeline, a plot."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np

from bgm import vocab
from bgm.v1 import gateway_pb2, music_pb2
from gateway import subtitles
from gateway import timeline as timeline_file

EMOTION_COLOURS = {
    vocab.JOY: "#f4c430", vocab.SADNESS: "#4a6fa5", vocab.DISGUST: "#6b8e23", vocab.ANGER: "#c0392b",
    vocab.SURPRISE: "#e67e22", vocab.FEAR: "#6c3483", vocab.NEUTRAL: "#95a5a6",
}


def emotion_name(value: int) -> str:
    return vocab.emotion_name(value) or "unspecified"


def srt(transcript: gateway_pb2.Transcript) -> str:
    """SubRip subtitles, cut by the conventions in ``gateway.subtitles``."""
    return subtitles.srt(subtitles.cues(transcript))


def vtt(transcript: gateway_pb2.Transcript) -> str:
    """WebVTT subtitles, the same cues as ``srt``."""
    return subtitles.vtt(subtitles.cues(transcript))


def timeline_json(transcript: gateway_pb2.Transcript, timeline: gateway_pb2.EmotionTimeline,
                  music: music_pb2.MusicHeader | None = None) -> str:
    """The timeline a creator can edit and hand back (``gateway.timeline``)."""
    return timeline_file.to_json(transcript, timeline, music)


# The plot grows with the video so that labels keep their size: inches per second of media.
PLOT_INCHES_PER_S = 0.1
PLOT_MIN_WIDTH_IN, PLOT_MAX_WIDTH_IN = 14.0, 600.0  # Agg draws at most 2**16 pixels across
TRANSCRIPT_ROWS = 6
SPAN_ROWS = 3
LABEL_CHARS = 80


def _width(artist: object, renderer: object, to_data: object) -> float:
    """A text's width in data units, as drawn."""
    box = artist.get_window_extent(renderer)  # type: ignore[attr-defined]
    (x0, _), (x1, _) = to_data.transform([(box.x0, 0), (box.x1, 0)])  # type: ignore[attr-defined]
    return float(x1 - x0)


def _pack(ax: object, renderer: object, items: list[tuple[float, str]], rows: int, fontsize: float,
          centred: bool, x_max: float) -> None:
    """Place each (x, text) on the first of ``rows`` rows where it overlaps nothing, measuring
    the real text; moved left to stay inside the axes, shortened with an ellipsis where no
    row has room. Rows are stacked top down in axes coordinates."""
    ends = [-np.inf] * rows
    pad = x_max * 0.002
    to_data = ax.transData.inverted()  # type: ignore[attr-defined]
    for x, text in items:
        label = text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"
        artist = ax.text(x, 0.0, label, fontsize=fontsize, va="center",  # type: ignore[attr-defined]
                         ha="left", transform=ax.get_xaxis_transform(), clip_on=False)  # type: ignore[attr-defined]
        w = _width(artist, renderer, to_data)
        left = x - w / 2 if centred else x
        left = max(0.0, min(left, x_max - w))
        row = next((r for r in range(rows) if ends[r] + pad <= left), None)
        if row is None:  # every row is taken here: the row that frees first, text shortened to fit
            row = int(np.argmin(ends))
            left = ends[row] + pad
            while label and left + w > x_max:
                label = label[:-2] + "…" if len(label) > 2 else ""
                artist.set_text(label)
                w = _width(artist, renderer, to_data)
        artist.set_x(left)
        artist.set_y(1.0 - (row + 0.5) / rows)
        ends[row] = left + w


def plot(out: IO[bytes], video: Path, transcript: gateway_pb2.Transcript,
         timeline: gateway_pb2.EmotionTimeline, fmt: str = "png") -> None:
    """A picture (PNG or SVG, written to ``out``) of ``figure``."""
    import matplotlib.pyplot as plt

    fig = figure(video, transcript, timeline)
    try:
        fig.savefig(out, format=fmt)
    finally:
        plt.close(fig)


def figure(video: Path, transcript: gateway_pb2.Transcript, timeline: gateway_pb2.EmotionTimeline) -> Any:
    """The emotion spans, labelled with their confidence, as coloured bands over the waveform,
    and the transcript in rows beneath it where no line overlaps another or runs off the
    edge (a matplotlib Figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bgm import media

    duration = transcript.duration_s or max((s.span.end_s for s in timeline.spans), default=1.0)
    try:
        wave = media.decode_audio(video, 8000, 1, "the video")[:, 0]
    except Exception:
        wave = np.zeros(1, dtype=np.float32)
    width = float(np.clip(duration * PLOT_INCHES_PER_S + 2, PLOT_MIN_WIDTH_IN, PLOT_MAX_WIDTH_IN))
    fig, (labels_ax, wave_ax, text_ax) = plt.subplots(
        3, 1, figsize=(width, 6.0), dpi=100, sharex=True, gridspec_kw={"height_ratios": [0.7, 2.6, 2.0]})
    for span in timeline.spans:
        wave_ax.axvspan(span.span.start_s, span.span.end_s, color=EMOTION_COLOURS.get(
            emotion_name(span.emotion), "#cccccc"), alpha=0.35, lw=0)
    t = np.arange(wave.shape[0]) / 8000
    peak = float(np.abs(wave).max()) or 1.0
    wave_ax.plot(t, wave / peak * 0.9, color="#222222", lw=0.3)
    wave_ax.set_ylim(-1.0, 1.0)
    wave_ax.set_xlim(0, duration)
    for ax in (labels_ax, wave_ax, text_ax):
        ax.set_yticks([])
    for ax in (labels_ax, text_ax):
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    labels_ax.set_title("Emotion timeline")
    text_ax.set_xlabel("time (s)")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    span_labels = [((s.span.start_s + s.span.end_s) / 2,
                    f"{emotion_name(s.emotion)} {s.confidence:.2f}" if s.confidence else emotion_name(s.emotion))
                   for s in timeline.spans]
    _pack(labels_ax, renderer, span_labels, SPAN_ROWS, 9, centred=True, x_max=duration)
    lines = [(seg.start_s, seg.text.strip()) for seg in transcript.segments if seg.text.strip()]
    _pack(text_ax, renderer, lines, TRANSCRIPT_ROWS, 7, centred=False, x_max=duration)
    return fig
