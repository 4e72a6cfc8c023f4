"""Subtitles as players and platforms expect them, cut from the transcript's word timings.

The conventions (Netflix's and the BBC's timed-text guides agree on these): a cue holds at
most two lines of at most 42 characters, stays on screen 1 to 7 seconds, never overlaps the
next, and breaks where the speech does: at the end of a sentence, else after a clause
(a comma, a semicolon, a colon), else between words, never inside one. Lines of a cue are
balanced, the break chosen after punctuation where one is near the middle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bgm.v1 import gateway_pb2

MAX_LINE_CHARS = 42
MAX_LINES = 2
MIN_CUE_S = 1.0
MAX_CUE_S = 7.0
# A pause this long between words ends a cue: the next words are a new thought.
PAUSE_S = 1.2
# Cues that follow each other closely are kept this far apart, so players do not blend them.
MIN_GAP_S = 0.08
SENTENCE_END = (".", "!", "?", "…")
CLAUSE_END = (",", ";", ":", "—", "–")


@dataclass(frozen=True)
class Word:
    text: str
    start_s: float
    end_s: float


@dataclass
class Cue:
    words: list[Word]
    start_s: float = 0.0
    end_s: float = 0.0

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def lines(self) -> list[str]:
        return layout(self.text)


def words_of(transcript: gateway_pb2.Transcript) -> list[Word]:
    """Every word with its time; a segment without word timings counts as one long word
    (it is split evenly across its time where it needs to be)."""
    out: list[Word] = []
    for seg in transcript.segments:
        if seg.words:
            out += [Word(w.text.strip(), w.start_s, max(w.end_s, w.start_s)) for w in seg.words if w.text.strip()]
            continue
        tokens = seg.text.split()
        step = (seg.end_s - seg.start_s) / max(1, len(tokens))
        out += [Word(t, seg.start_s + i * step, seg.start_s + (i + 1) * step) for i, t in enumerate(tokens)]
    return out


def _fits(words: Sequence[Word]) -> bool:
    text = " ".join(w.text for w in words)
    return len(layout(text)) <= MAX_LINES and all(len(line) <= MAX_LINE_CHARS for line in layout(text)) \
        and words[-1].end_s - words[0].start_s <= MAX_CUE_S


def _split_point(words: Sequence[Word]) -> int:
    """Where to end a cue that cannot take the next word: after the last clause or sentence
    end in its second half, else here."""
    for i in range(len(words) - 1, len(words) // 2 - 1, -1):
        if words[i].text.endswith(SENTENCE_END + CLAUSE_END):
            return i + 1
    return len(words)


def group(words: Sequence[Word]) -> list[list[Word]]:
    """The words in cues: a sentence end or a long pause always ends one; a cue that is full
    (two lines, or seven seconds) ends at its last clause."""
    cues: list[list[Word]] = []
    current: list[Word] = []
    for word in words:
        if current and word.start_s - current[-1].end_s >= PAUSE_S:
            cues.append(current)
            current = []
        if current and not _fits([*current, word]):
            cut = _split_point(current)
            cues.append(current[:cut])
            current = current[cut:]
        current.append(word)
        if word.text.endswith(SENTENCE_END):
            cues.append(current)
            current = []
    if current:
        cues.append(current)
    return _join_short(cues)


def _join_short(cues: list[list[Word]]) -> list[list[Word]]:
    """A cue spoken in under a second ("Yes.") joins its neighbour where the two fit in one."""
    out: list[list[Word]] = []
    for cue in cues:
        short = cue[-1].end_s - cue[0].start_s < MIN_CUE_S
        if out and (short or out[-1][-1].end_s - out[-1][0].start_s < MIN_CUE_S) and _fits([*out[-1], *cue]) \
                and cue[0].start_s - out[-1][-1].end_s < PAUSE_S:
            out[-1] = [*out[-1], *cue]
        else:
            out.append(cue)
    return out


def layout(text: str) -> list[str]:
    """One line if it fits, else two balanced lines (the break after punctuation where that
    costs little balance); text too long for two lines comes back as more lines."""
    if len(text) <= MAX_LINE_CHARS:
        return [text]
    words = text.split(" ")
    best: tuple[float, int] | None = None
    for i in range(1, len(words)):
        first, second = " ".join(words[:i]), " ".join(words[i:])
        longest = max(len(first), len(second))
        # Balance first; a break after punctuation is worth a few characters of imbalance.
        cost = longest - (4 if words[i - 1].endswith(SENTENCE_END + CLAUSE_END) else 0)
        if longest <= MAX_LINE_CHARS and (best is None or cost < best[0]):
            best = (cost, i)
    if best is None:  # cannot be two lines: greedy fill (the grouping never asks for this)
        lines, line = [], ""
        for word in words:
            if line and len(line) + 1 + len(word) > MAX_LINE_CHARS:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        return [*lines, line]
    return [" ".join(words[: best[1]]), " ".join(words[best[1]:])]


def time_cues(groups: Sequence[Sequence[Word]], duration_s: float | None = None) -> list[Cue]:
    """Times for each cue: from its first word to its last, held to at least a second where
    the next cue leaves room, at most seven, never overlapping the next."""
    cues = [Cue(list(g), g[0].start_s, g[-1].end_s) for g in groups if g]
    for i, cue in enumerate(cues):
        limit = cues[i + 1].start_s - MIN_GAP_S if i + 1 < len(cues) else (duration_s or float("inf"))
        cue.end_s = min(max(cue.end_s, cue.start_s + MIN_CUE_S), cue.start_s + MAX_CUE_S, limit)
        if cue.end_s - cue.start_s < MIN_CUE_S and i > 0:
            # No room after it: start earlier, into the gap after the previous cue.
            earliest = cues[i - 1].end_s + MIN_GAP_S
            cue.start_s = max(earliest, min(cue.start_s, cue.end_s - MIN_CUE_S))
        cue.end_s = max(cue.end_s, cue.start_s + 0.01)
    return cues


def cues(transcript: gateway_pb2.Transcript) -> list[Cue]:
    return time_cues(group(words_of(transcript)), transcript.duration_s or None)


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def srt(items: Iterable[Cue]) -> str:
    blocks = [f"{i}\n{_timestamp(c.start_s, ',')} --> {_timestamp(c.end_s, ',')}\n" + "\n".join(c.lines()) + "\n"
              for i, c in enumerate(items, start=1)]
    return "\n".join(blocks)


def vtt(items: Iterable[Cue]) -> str:
    blocks = [f"{_timestamp(c.start_s, '.')} --> {_timestamp(c.end_s, '.')}\n" + "\n".join(c.lines()) + "\n"
              for c in items]
    return "WEBVTT\n\n" + "\n".join(blocks)
