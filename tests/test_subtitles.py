"""Subtitles by convention: at most two lines of 42 characters, 1-7 s on screen, in order,
never overlapping, broken at sentences and clauses. Checked on the real recordings in
``../shared/realworld`` transcribed by the STT service, on espeak speech, and on worked
examples; the files parse with the `srt` and `webvtt-py` libraries."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import srt as srt_lib
import webvtt

from bench import realworld
from bgm.v1 import gateway_pb2, stt_pb2
from gateway import outputs, subtitles
from tests.conftest import speak
from tests.test_stt import segments, transcribe


def check(cues: list[subtitles.Cue], words: list[subtitles.Word]) -> None:
    """The conventions, and nothing lost: every word appears once, in order."""
    assert " ".join(c.text for c in cues).split() == [w.text for w in words]
    previous_end = 0.0
    for cue in cues:
        lines = cue.lines()
        assert 1 <= len(lines) <= subtitles.MAX_LINES, lines
        assert all(0 < len(line) <= subtitles.MAX_LINE_CHARS for line in lines), lines
        assert subtitles.MIN_CUE_S - 1e-6 <= cue.end_s - cue.start_s <= subtitles.MAX_CUE_S + 1e-6, cue
        assert cue.start_s >= previous_end, "cues overlap or are out of order"
        previous_end = cue.end_s


def parse_both(transcript: gateway_pb2.Transcript) -> None:
    parsed = list(srt_lib.parse(outputs.srt(transcript)))
    assert parsed and all(s.content for s in parsed)
    captions = webvtt.from_buffer(io.StringIO(outputs.vtt(transcript)))
    assert len(captions) == len(parsed)
    assert [c.text for c in captions] == [s.content for s in parsed]


def as_transcript(events, duration: float) -> gateway_pb2.Transcript:
    return gateway_pb2.Transcript(segments=segments(events), duration_s=duration)


def w(text: str, start: float, end: float) -> stt_pb2.Word:
    return stt_pb2.Word(text=text, start_s=start, end_s=end)


def test_a_long_segment_becomes_cues_at_sentence_and_clause_ends():
    # The example's old first cue: 90 characters, one line, 9 s on screen.
    text = ("What a wonderful day. I am so happy and excited. We won the award and I love this amazing "
            "team, and tomorrow we celebrate together with everyone who helped us.")
    words, t = [], 0.0
    for token in text.split():
        words.append(w(token, t, t + 0.3))
        t += 0.35
    transcript = gateway_pb2.Transcript(segments=[stt_pb2.Segment(text=text, start_s=0, end_s=t, words=words)],
                                        duration_s=t + 1)
    cues = subtitles.cues(transcript)
    check(cues, subtitles.words_of(transcript))
    assert cues[0].text == "What a wonderful day." and cues[1].text == "I am so happy and excited."
    assert any(c.text.endswith("team,") for c in cues)  # the full cue broke at the clause
    parse_both(transcript)


def test_two_lines_are_balanced_and_break_after_punctuation():
    assert subtitles.layout("Short line.") == ["Short line."]
    first, second = subtitles.layout("We won the award, and I love this amazing team of people")
    assert first == "We won the award, and I love" or first.endswith(",")
    assert abs(len(first) - len(second)) <= 12


def test_a_quick_yes_joins_its_neighbour_and_short_cues_get_a_second():
    words = [w("Yes.", 0.0, 0.3), w("That", 0.4, 0.6), w("is", 0.6, 0.7), w("right.", 0.7, 1.0),
             w("Later", 5.0, 5.4), w("on.", 5.4, 5.6)]
    transcript = gateway_pb2.Transcript(segments=[stt_pb2.Segment(words=words)], duration_s=8)
    cues = subtitles.cues(transcript)
    check(cues, subtitles.words_of(transcript))
    assert [c.text for c in cues] == ["Yes. That is right.", "Later on."]


@pytest.mark.skipif(not realworld.available(), reason=f"the real-world material is not at {realworld.ROOT}")
@pytest.mark.parametrize("name", ["jfk.flac", "ljspeech_LJ001-0001-0005.flac", "librispeech_1272-128104-0000.wav",
                                  "cmu_arctic_aew_axb_a0001-a0006.flac"])
def test_real_speech_gets_conventional_subtitles(stt_server, name):
    path = realworld.ROOT / "speech" / name
    events = transcribe(stt_server.address, path)
    transcript = as_transcript(events, events[-1].summary.duration_s)
    cues = subtitles.cues(transcript)
    check(cues, subtitles.words_of(transcript))
    parse_both(transcript)


def test_espeak_speech_gets_conventional_subtitles(stt_server, tmp_path: Path):
    text = ("Good evening and welcome. Tonight, we look at the history of the harbour, the ships that came, "
            "and the people who built the town. It is a long story, so let us begin.")
    events = transcribe(stt_server.address, speak(text, tmp_path / "talk.wav"))
    transcript = as_transcript(events, events[-1].summary.duration_s)
    check(subtitles.cues(transcript), subtitles.words_of(transcript))
    parse_both(transcript)
