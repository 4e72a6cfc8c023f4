"""The timeline a creator edits: the JSON the CLI writes (versioned) is the JSON it reads
back with ``--timeline-in``, and an edited timeline passes these checks before any work
starts, each error naming the span and the field.

Seeds: the file records the seed each span's music was made with. Reading it back keeps
them, so unchanged spans get the same music; with a new ``--seed`` every span takes a new
seed except those marked ``"lock": true``, which keep theirs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from bgm import vocab
from bgm.errors import InvalidInput
from bgm.v1 import common_pb2, gateway_pb2, music_pb2

VERSION = 1
JOIN_TOLERANCE_S = 1e-3  # spans must meet; a millisecond absorbs hand-edited rounding
END_TOLERANCE_S = 0.1  # the last span ends where the video does, give or take a frame or two
# The JSON fields of a span; the emotion field is named after the service's word.
EMOTION_KEY = vocab.EMOTION.name
REQUIRED_KEYS = (EMOTION_KEY, "start_s", "end_s")
SPAN_KEYS = {*REQUIRED_KEYS, "confidence", "seed", "style", "intensity", "lock"}


class TimelineError(InvalidInput):
    """An edited timeline that cannot be used; the message names the span and the field."""


def check_spans(spans: Sequence[common_pb2.EmotionSpan]) -> None:
    """Sorted, meeting exactly from 0, known emotions and styles, sensible controls."""
    if not spans:
        raise TimelineError("the timeline has no spans: give at least one")
    expected = 0.0
    for i, span in enumerate(spans):
        where = f"spans[{i}]"
        if vocab.emotion_name(span.emotion) is None:
            raise TimelineError(f"{where}.emotion is unknown; use {vocab.choices(vocab.EMOTIONS)}")
        start, end = span.span.start_s, span.span.end_s
        if not (math.isfinite(start) and math.isfinite(end)):
            raise TimelineError(f"{where}: start_s and end_s must be finite numbers")
        if abs(start - expected) > JOIN_TOLERANCE_S:
            if i == 0:
                raise TimelineError(f"{where}.start_s is {start:g} s: the first span starts at 0")
            kind = "a hole" if start > expected else "an overlap"
            raise TimelineError(f"{where}.start_s is {start:g} s but spans[{i - 1}] ends at {expected:g} s "
                                f"({kind}); spans must be sorted and meet exactly")
        if end <= start:
            raise TimelineError(f"{where}.end_s {end:g} s is not after its start_s {start:g} s")
        control = span.control
        if control.style and control.style not in vocab.MUSIC_STYLES:
            raise TimelineError(f"{where}.style {control.style!r} is unknown; use "
                                f"{vocab.choices(vocab.MUSIC_STYLES)} or leave it out")
        if control.HasField("intensity") and not 0.0 <= control.intensity <= 1.0:
            raise TimelineError(f"{where}.intensity {control.intensity:g} is out of range [0, 1]")
        if control.lock and not control.HasField("seed"):
            raise TimelineError(f"{where}.lock needs the span's seed (the timeline bgm writes records it)")
        expected = end


def fit_to_duration(spans: Sequence[common_pb2.EmotionSpan], duration_s: float) -> None:
    """The last span must end where the video does (within ``END_TOLERANCE_S``); it is then
    set to end exactly there."""
    end = spans[-1].span.end_s
    if abs(end - duration_s) > END_TOLERANCE_S:
        kind = "beyond the end of" if end > duration_s else "before the end of"
        raise TimelineError(f"spans[{len(spans) - 1}].end_s is {end:g} s, {kind} the video ({duration_s:.3f} s); "
                            "the spans must cover the video exactly")
    spans[-1].span.end_s = duration_s


# ----- JSON -------------------------------------------------------------------------------
def to_json(transcript: gateway_pb2.Transcript, timeline: gateway_pb2.EmotionTimeline,
            music: music_pb2.MusicHeader | None = None) -> str:
    seeds = list(music.span_seeds) if music is not None else []
    spans = []
    for i, s in enumerate(timeline.spans):
        entry: dict[str, Any] = dict(emotion=vocab.emotion_name(s.emotion) or "unspecified",
                                     start_s=s.span.start_s, end_s=s.span.end_s, confidence=round(s.confidence, 4))
        if i < len(seeds):
            entry["seed"] = seeds[i]
        elif s.control.HasField("seed"):
            entry["seed"] = s.control.seed
        if s.control.style:
            entry["style"] = s.control.style
        if s.control.HasField("intensity"):
            entry["intensity"] = round(s.control.intensity, 4)
        if s.control.lock:
            entry["lock"] = True
        spans.append(entry)
    doc: dict[str, Any] = {
        "version": VERSION,
        "duration_s": transcript.duration_s,
        "language": transcript.language,
        "emotion_backend": timeline.backend,
    }
    if music is not None:
        doc[vocab.MUSIC.name] = {"backend": music.backend, "seed": music.seed, "tempo_bpm": round(music.tempo_bpm, 3)}
    doc["spans"] = spans
    doc["sentences"] = [
        dict(text=sentence.text, start_s=sentence.span.start_s, end_s=sentence.span.end_s,
             language=sentence.language, emotion=vocab.emotion_name(emo.emotion) or "unspecified",
             probabilities={vocab.emotion_name(p.emotion) or "unspecified": round(p.probability, 4)
                            for p in emo.probabilities})
        for sentence, emo in zip(timeline.sentences, timeline.segments, strict=False)
    ]
    doc["transcript"] = [
        {"text": seg.text, "start_s": seg.start_s, "end_s": seg.end_s, "language": seg.language,
         "translated": seg.translated,
         "words": [{"text": w.text, "start_s": w.start_s, "end_s": w.end_s} for w in seg.words]}
        for seg in transcript.segments
    ]
    return json.dumps(doc, indent=2)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TimelineError(f"{where} must be a number, not {json.dumps(value)}")
    return float(value)


def _span(raw: object, i: int, new_seed: bool) -> common_pb2.EmotionSpan:
    where = f"spans[{i}]"
    if not isinstance(raw, dict):
        raise TimelineError(f"{where} must be an object with emotion, start_s and end_s")
    unknown = sorted(set(raw) - SPAN_KEYS)
    if unknown:
        raise TimelineError(f"{where}: unknown field {unknown[0]!r}; a span has {', '.join(sorted(SPAN_KEYS))}")
    for field in REQUIRED_KEYS:
        if field not in raw:
            raise TimelineError(f"{where}.{field} is missing")
    name = raw[EMOTION_KEY]
    if name not in vocab.EMOTIONS:
        raise TimelineError(f"{where}.emotion {json.dumps(name)} is unknown; use {vocab.choices(vocab.EMOTIONS)}")
    span = common_pb2.EmotionSpan(emotion=vocab.emotion_enum(name), span=common_pb2.TimeSpan(  # type: ignore[arg-type]
        start_s=_number(raw["start_s"], f"{where}.start_s"), end_s=_number(raw["end_s"], f"{where}.end_s")))
    if "confidence" in raw:
        span.confidence = _number(raw["confidence"], f"{where}.confidence")
    style = raw.get("style", "")
    if not isinstance(style, str):
        raise TimelineError(f"{where}.style must be a string")
    span.control.style = style
    if "intensity" in raw:
        span.control.intensity = _number(raw["intensity"], f"{where}.intensity")
    lock = raw.get("lock", False)
    if not isinstance(lock, bool):
        raise TimelineError(f"{where}.lock must be true or false")
    span.control.lock = lock
    if "seed" in raw:
        seed = raw["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise TimelineError(f"{where}.seed must be a whole number from 0")
        if lock or not new_seed:
            span.control.seed = seed
    return span


def _transcript(raw: object, duration_s: float) -> gateway_pb2.Transcript:
    transcript = gateway_pb2.Transcript(duration_s=duration_s)
    if not isinstance(raw, list):
        raise TimelineError("transcript must be a list of segments")
    for i, seg in enumerate(raw):
        where = f"transcript[{i}]"
        if not isinstance(seg, dict):
            raise TimelineError(f"{where} must be an object")
        out = transcript.segments.add(text=str(seg.get("text", "")),
                                      start_s=_number(seg.get("start_s", 0.0), f"{where}.start_s"),
                                      end_s=_number(seg.get("end_s", 0.0), f"{where}.end_s"),
                                      language=str(seg.get("language", "")), translated=bool(seg.get("translated")))
        for j, word in enumerate(seg.get("words", [])):
            if not isinstance(word, dict):
                raise TimelineError(f"{where}.words[{j}] must be an object")
            out.words.add(text=str(word.get("text", "")),
                          start_s=_number(word.get("start_s", 0.0), f"{where}.words[{j}].start_s"),
                          end_s=_number(word.get("end_s", 0.0), f"{where}.words[{j}].end_s"))
    return transcript


def from_json(text: str, new_seed: bool = False) -> gateway_pb2.EditedTimeline:
    """An edited timeline from the JSON bgm writes; ``new_seed``: the run gives a new seed, so
    only locked spans keep the seed the file records."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TimelineError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(doc, dict):
        raise TimelineError("a timeline is a JSON object with version and spans")
    version = doc.get("version")
    if version is None:
        raise TimelineError(f"version is missing: write it as {VERSION} (files from bgm before timelines "
                            "were versioned have none; check the spans and add \"version\": 1)")
    if version != VERSION:
        raise TimelineError(f"version {json.dumps(version)} is not supported; this bgm reads version {VERSION}")
    raw_spans = doc.get("spans")
    if not isinstance(raw_spans, list):
        raise TimelineError("spans is missing or not a list")
    edited = gateway_pb2.EditedTimeline(spans=[_span(raw, i, new_seed) for i, raw in enumerate(raw_spans)])
    duration = doc.get("duration_s", 0.0)
    edited.transcript.CopyFrom(_transcript(doc.get("transcript", []), _number(duration, "duration_s")))
    edited.transcript.language = str(doc.get("language", ""))
    check_spans(edited.spans)
    return edited
