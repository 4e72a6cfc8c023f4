"""The seven emotions as the classifier's columns: ``vocab.EMOTIONS`` order, which the
probability vectors follow."""

from __future__ import annotations

from bgm import vocab

EMOTIONS = vocab.EMOTIONS
NEUTRAL = EMOTIONS.index(vocab.NEUTRAL)


def index_to_enum(index: int) -> int:
    return vocab.emotion_enum(EMOTIONS[index])
