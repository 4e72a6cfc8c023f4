"""Files a person wants beside the remixed video: subtitles, the timeline, a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from bgm import vocab
from bgm.v1 import gateway_pb2
from gateway import subtitles

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


def timeline_json(transcript: gateway_pb2.Transcript, timeline: gateway_pb2.EmotionTimeline) -> str:
    doc = {
        "duration_s": transcript.duration_s,
        "language": transcript.language,
        "emotion_backend": timeline.backend,
        "spans": [dict(emotion=emotion_name(s.emotion), start_s=s.span.start_s, end_s=s.span.end_s,
                       confidence=round(s.confidence, 4)) for s in timeline.spans],
        "sentences": [
            dict(text=sentence.text, start_s=sentence.span.start_s, end_s=sentence.span.end_s,
                 language=sentence.language, emotion=emotion_name(emo.emotion),
                 probabilities={emotion_name(p.emotion): round(p.probability, 4) for p in emo.probabilities})
            for sentence, emo in zip(timeline.sentences, timeline.segments, strict=False)
        ],
        "transcript": [
            {"text": seg.text, "start_s": seg.start_s, "end_s": seg.end_s, "language": seg.language,
             "translated": seg.translated,
             "words": [{"text": w.text, "start_s": w.start_s, "end_s": w.end_s} for w in seg.words]}
            for seg in transcript.segments
        ],
    }
    return json.dumps(doc, indent=2)


def plot(out: IO[bytes], video: Path, transcript: gateway_pb2.Transcript,
         timeline: gateway_pb2.EmotionTimeline) -> None:
    """A PNG (written to ``out``): the emotion spans as coloured bands over the waveform, with the transcript."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bgm import media

    duration = transcript.duration_s or max((s.span.end_s for s in timeline.spans), default=1.0)
    try:
        wave = media.decode_audio(video, 8000, 1, "the video")[:, 0]
    except Exception:
        wave = np.zeros(1, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(14, 4.5), dpi=100)
    for span in timeline.spans:
        name = emotion_name(span.emotion)
        ax.axvspan(span.span.start_s, span.span.end_s, color=EMOTION_COLOURS[name], alpha=0.35, lw=0)
        ax.text((span.span.start_s + span.span.end_s) / 2, 1.02, name, ha="center", va="bottom", fontsize=10)
    t = np.arange(wave.shape[0]) / 8000
    peak = float(np.abs(wave).max()) or 1.0
    ax.plot(t, wave / peak * 0.9, color="#222222", lw=0.3)
    for i, seg in enumerate(transcript.segments):
        ax.text(seg.start_s, -1.0 + 0.12 * (i % 3), seg.text[:60], fontsize=7, va="bottom")
    ax.set_xlim(0, duration)
    ax.set_ylim(-1.05, 1.15)
    ax.set_xlabel("time (s)")
    ax.set_yticks([])
    ax.set_title("Emotion timeline")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
