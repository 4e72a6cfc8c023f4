"""The product's seven emotions, in the enum order that probability vectors follow."""

from __future__ import annotations

from bgm.v1 import common_pb2

EMOTIONS = ("joy", "sadness", "disgust", "anger", "surprise", "fear", "neutral")
NEUTRAL = EMOTIONS.index("neutral")
ENUM: dict[str, int] = {name: int(common_pb2.Emotion.Value(f"EMOTION_{name.upper()}")) for name in EMOTIONS}
NAME: dict[int, str] = {value: name for name, value in ENUM.items()}


def index_to_enum(index: int) -> int:
    return ENUM[EMOTIONS[index]]

