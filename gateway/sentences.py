"""Whisper segments are decoding windows, not sentences: one can end mid-sentence or hold
the end of one mood and the start of the next. Emotion is judged per sentence, so the
transcript is re-cut at sentence ends using the word timestamps."""

from __future__ import annotations

from dataclasses import dataclass

from bgm.v1 import stt_pb2

ENDINGS = (".", "!", "?", "…", "。", "！", "？")


@dataclass(frozen=True)
class Sentence:
    text: str
    start_s: float
    end_s: float
    language: str
    confidence: float


def split(segments: list[stt_pb2.Segment], confidence: dict[int, float]) -> list[Sentence]:
    """Sentences with their times; a segment without word timings stays whole."""
    out: list[Sentence] = []
    words: list[stt_pb2.Word] = []
    language, conf = "", 1.0

    def flush() -> None:
        if words:
            text = " ".join(w.text for w in words).replace(" ,", ",").strip()
            out.append(Sentence(text, words[0].start_s, max(words[-1].end_s, words[0].start_s), language, conf))
            words.clear()

    for index, seg in enumerate(segments):
        language = "en" if seg.translated else seg.language
        conf = confidence.get(index, 1.0)
        if not seg.words:
            flush()
            out.append(Sentence(seg.text.strip(), seg.start_s, seg.end_s, language, conf))
            continue
        for word in seg.words:
            words.append(word)
            if word.text.rstrip("\"')]»”").endswith(ENDINGS):
                flush()
    flush()
    return [s for s in out if s.text]
