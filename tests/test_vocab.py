"""The product's words live in bgm/vocab.py: every per-emotion table and every backend
registry covers exactly its vocabulary, and no emotion, backend or service name, nor a
message limit, is spelled as a literal anywhere else in the hand-written source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bgm import vocab
from bgm.v1 import common_pb2, emotion_pb2, gateway_pb2, mixer_pb2, music_pb2, stt_pb2

ROOT = Path(__file__).resolve().parents[1]
SOURCE = [p for folder in ("bgm", "services", "gateway") for p in (ROOT / folder).rglob("*.py")
          if "bgm/v1" not in p.as_posix() and p.name != "vocab.py"]
WORDS = {*vocab.EMOTIONS, *vocab.EMOTION_BACKENDS, *vocab.MUSIC_BACKENDS, *vocab.SEPARATION_BACKENDS,
         *(s.name for s in vocab.SERVICES), vocab.AUTO}
LITERAL = re.compile(r"""(?<![\w.])(["'])(""" + "|".join(sorted(WORDS)) + r")\1")
LIMIT = re.compile(r"\b\d+\s*\*\s*(1024\s*\*\s*1024|2\s*\*\*\s*20)\b")


def test_emotions_follow_the_proto_enum():
    names = [n.removeprefix("EMOTION_").lower() for n, v in common_pb2.Emotion.items() if v]
    assert list(vocab.EMOTIONS) == names
    for name in vocab.EMOTIONS:
        assert vocab.emotion_name(vocab.emotion_enum(name)) == name
    assert vocab.emotion_name(common_pb2.EMOTION_UNSPECIFIED) is None


def test_services_name_their_grpc_services():
    descriptors = {d.services_by_name[n].full_name for d, n in (
        (stt_pb2.DESCRIPTOR, "SpeechToText"), (emotion_pb2.DESCRIPTOR, "EmotionClassifier"),
        (music_pb2.DESCRIPTOR, "MusicGenerator"), (mixer_pb2.DESCRIPTOR, "Mixer"), (gateway_pb2.DESCRIPTOR, "Gateway"))}
    assert {s.grpc_name for s in vocab.SERVICES} == descriptors


@pytest.mark.parametrize("table", ["services.music.styles:STYLES", "services.music.styles:PROMPTS",
                                   "services.music.levels:EMOTION_OFFSET_LU", "gateway.outputs:EMOTION_COLOURS"])
def test_every_per_emotion_table_covers_the_emotions(table):
    import importlib

    module, name = table.split(":")
    assert set(getattr(importlib.import_module(module), name)) == set(vocab.EMOTIONS)


def test_every_backend_registry_matches_its_vocabulary():
    from services.emotion import backends as emotion
    from services.mixer import separation
    from services.music import backends as music

    assert tuple(music.REGISTRY) == vocab.MUSIC_BACKENDS
    assert tuple(emotion.REGISTRY) == vocab.EMOTION_BACKENDS
    assert tuple(separation.REGISTRY) == vocab.SEPARATION_BACKENDS


def test_no_product_word_is_spelled_outside_the_vocabulary():
    found = []
    for path in SOURCE:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if LITERAL.search(code) or LIMIT.search(code):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "use bgm.vocab instead of these literals:\n" + "\n".join(found)
