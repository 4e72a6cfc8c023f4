"""The emotion service over gRPC with the real nade model."""

from __future__ import annotations

import grpc
import pytest

from bgm import vocab
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, emotion_pb2, emotion_pb2_grpc
from services.emotion.labels import EMOTIONS
from services.emotion.servicer import EmotionServicer
from services.emotion.settings import EmotionSettings
from tests.conftest import channel, health_status, start
from tests.emotion_sentences import LABELLED

ENUM = {name: vocab.emotion_enum(name) for name in vocab.EMOTIONS}


@pytest.fixture(scope="module")
def emotion(loop):
    running = start(loop, [EmotionServicer(EmotionSettings(backend="nade"), ServerSettings())])
    yield emotion_pb2_grpc.EmotionClassifierStub(channel(running.address)), running
    loop.run(running.stop(0))


def segment(text: str, start: float, end: float, language: str = "en") -> emotion_pb2.TextSegment:
    return emotion_pb2.TextSegment(text=text, span=common_pb2.TimeSpan(start_s=start, end_s=end), language=language)


def test_nade_accuracy_on_a_labelled_set(emotion):
    stub, _ = emotion
    items = [(label, text) for label, texts in LABELLED.items() for text in texts]
    assert len(items) >= 30
    request = emotion_pb2.ClassifyRequest(
        segments=[segment(text, 3 * i, 3 * i + 2.5) for i, (_, text) in enumerate(items)])
    reply = stub.Classify(request, timeout=60)
    assert reply.backend == "nade" and len(reply.segments) == len(items)
    per_class: dict[str, list[bool]] = {}
    for (label, _), result in zip(items, reply.segments, strict=True):
        assert [p.emotion for p in result.probabilities] == [ENUM[e] for e in EMOTIONS]
        assert sum(p.probability for p in result.probabilities) == pytest.approx(1.0, abs=1e-4)
        per_class.setdefault(label, []).append(result.emotion == ENUM[label])
    recalls = {label: sum(hits) / len(hits) for label, hits in per_class.items()}
    overall = sum(sum(h) for h in per_class.values()) / len(items)
    macro = sum(recalls.values()) / len(recalls)
    print(f"\nnade: overall accuracy {overall:.2f}, macro accuracy {macro:.2f}; per class "
          + ", ".join(f"{k} {v:.2f}" for k, v in recalls.items()))
    assert overall >= 0.6


def test_timeline_is_smoothed_over_grpc(emotion):
    stub, _ = emotion
    joy = "We won the championship and I could not be more delighted."
    sad = "I miss my grandmother so much since she passed away."
    request = emotion_pb2.ClassifyRequest(
        segments=[segment(joy, 0, 5), segment(joy, 5, 10), segment(sad, 10, 12),
                  segment(joy, 12, 17), segment(joy, 17, 22)], duration_s=22)
    reply = stub.Classify(request, timeout=30)
    assert [(s.emotion, s.span.start_s, s.span.end_s) for s in reply.spans] == [(ENUM["joy"], 0.0, 22.0)]
    # The request's own smoothing options win over the server's defaults.
    request.smoothing.min_span_s = 0.0
    reply = stub.Classify(request, timeout=30)
    assert [s.emotion for s in reply.spans] == [ENUM["joy"], ENUM["sadness"], ENUM["joy"]]


def test_no_speech_is_one_neutral_span_and_other_languages_are_flagged(emotion):
    stub, _ = emotion
    reply = stub.Classify(emotion_pb2.ClassifyRequest(duration_s=12.5), timeout=30)
    assert [(s.emotion, s.span.start_s, s.span.end_s) for s in reply.spans] == [(ENUM["neutral"], 0.0, 12.5)]
    reply = stub.Classify(emotion_pb2.ClassifyRequest(
        segments=[segment("Ich bin sehr glücklich heute.", 0, 2, language="de"), segment("Fine.", 2, 3)]), timeout=30)
    assert [s.non_english for s in reply.segments] == [True, False]
    assert reply.spans[-1].span.end_s == 3.0


@pytest.mark.parametrize(("request_", "fragment"), [
    (emotion_pb2.ClassifyRequest(), "nothing to classify"),
    (emotion_pb2.ClassifyRequest(segments=[segment("hi", -1, 2)]), "negative time"),
    (emotion_pb2.ClassifyRequest(segments=[segment("hi", 5, 2)]), "end 2 s is before start 5 s"),
    (emotion_pb2.ClassifyRequest(segments=[segment("word " * 1000, 0, 2)]), "over the limit of 2000"),
    (emotion_pb2.ClassifyRequest(segments=[segment("hi", 0, float("nan"))]), "finite"),
    (emotion_pb2.ClassifyRequest(segments=[segment("hi", 0, 2)], duration_s=-3), "non-negative"),
    (emotion_pb2.ClassifyRequest(segments=[segment("hi", 0, 2)],
                                 smoothing=emotion_pb2.SmoothingOptions(min_span_s=-1)), "min_span_s"),
])
def test_bad_input_is_invalid_argument(emotion, request_, fragment):
    stub, running = emotion
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    assert health_status(channel(running.address), "bgm.v1.EmotionClassifier") == "SERVING"
