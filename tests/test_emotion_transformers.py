"""The transformers backend's loading and label-mapping code, on a tiny model built here."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from bgm import vocab
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, emotion_pb2, emotion_pb2_grpc
from services.emotion.servicer import EmotionServicer
from services.emotion.settings import EmotionSettings
from tests.conftest import channel, start
from tests.tiny_models import HARTMANN_LABELS, tiny_text_classifier

ENUM = {name: vocab.emotion_enum(name) for name in vocab.EMOTIONS}


@pytest.mark.parametrize("favourite", ["sadness", "surprise"])
def test_tiny_model_loads_from_disk_and_answers_through_grpc(loop, tmp_path, favourite):
    model_dir = tiny_text_classifier(tmp_path / "model", favourite=favourite)
    servicer = EmotionServicer(EmotionSettings(backend="transformers", model=str(model_dir), device="cpu"),
                               ServerSettings())
    running = start(loop, [servicer])
    try:
        stub = emotion_pb2_grpc.EmotionClassifierStub(channel(running.address))
        reply = stub.Classify(emotion_pb2.ClassifyRequest(segments=[
            emotion_pb2.TextSegment(text=t, span=common_pb2.TimeSpan(start_s=3 * i, end_s=3 * i + 2))
            for i, t in enumerate(["I am so happy today", "what a surprise", "the meeting is at noon"])]), timeout=60)
        assert reply.backend == "transformers"
        for result in reply.segments:
            # The model's label order differs from ours; the mapping must follow the names.
            assert result.emotion == ENUM[favourite]
            assert sum(p.probability for p in result.probabilities) == pytest.approx(1.0, abs=1e-4)
        assert [(s.emotion, s.span.start_s, s.span.end_s) for s in reply.spans] == [(ENUM[favourite], 0.0, 8.0)]
    finally:
        loop.run(running.stop(0))


def test_a_model_without_our_labels_is_refused_at_load(tmp_path):
    from bgm.models import ModelNotFound
    from services.emotion.backends import TransformersBackend

    labels = [label for label in HARTMANN_LABELS if label != "fear"] + ["optimism"]
    model_dir = tiny_text_classifier(tmp_path / "model", labels=labels)
    with pytest.raises(ModelNotFound, match=r"lack \['fear'\]"):
        TransformersBackend(str(model_dir), "cpu", 8)
