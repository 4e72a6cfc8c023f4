"""The EmotionClassifier gRPC servicer."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import numpy as np
from grpc import aio

from bgm import settings, vocab
from bgm.errors import ConcurrencyLimiter, InvalidInput
from bgm.server import ModelServicer, Servicer
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, emotion_pb2, emotion_pb2_grpc
from services.emotion import backends
from services.emotion.labels import EMOTIONS, index_to_enum
from services.emotion.settings import EmotionSettings
from services.emotion.smoothing import Scored, Span, smooth


class EmotionServicer(ModelServicer, emotion_pb2_grpc.EmotionClassifierServicer):
    service_name = emotion_pb2.DESCRIPTOR.services_by_name["EmotionClassifier"].full_name

    def __init__(self, emotion: EmotionSettings, server: ServerSettings) -> None:
        super().__init__()
        self.settings = emotion
        self.limiter = ConcurrencyLimiter(server.max_concurrency, "the emotion service")
        self.backend: backends.EmotionBackend | None = None

    def add_to_server(self, server: aio.Server) -> None:
        emotion_pb2_grpc.add_EmotionClassifierServicer_to_server(self, server)

    async def load(self) -> None:
        self.backend = await asyncio.to_thread(backends.create, self.settings)
        self.ready = True

    def validate(self, request: emotion_pb2.ClassifyRequest) -> float:
        """Check the request; return the media duration to cover."""
        if len(request.segments) > self.settings.max_segments:
            raise InvalidInput(f"{len(request.segments)} segments is over the limit of {self.settings.max_segments}")
        for i, seg in enumerate(request.segments):
            start, end = seg.span.start_s, seg.span.end_s
            if not (math.isfinite(start) and math.isfinite(end)):
                raise InvalidInput(f"segment {i}: times must be finite numbers")
            if start < 0 or end < 0:
                raise InvalidInput(f"segment {i}: negative time ({start:g}..{end:g} s)")
            if end < start:
                raise InvalidInput(f"segment {i}: end {end:g} s is before start {start:g} s")
            if len(seg.text) > self.settings.max_text_chars:
                raise InvalidInput(
                    f"segment {i}: text of {len(seg.text)} characters is over the limit of "
                    f"{self.settings.max_text_chars}; split it into sentences")
        duration = request.duration_s
        if not math.isfinite(duration) or duration < 0:
            raise InvalidInput(f"duration_s {duration!r} must be a non-negative number")
        last_end = max((s.span.end_s for s in request.segments), default=0.0)
        if duration == 0:
            if not request.segments:
                raise InvalidInput("nothing to classify: send segments, or a duration_s for media with no speech")
            duration = last_end
        if duration <= 0:
            raise InvalidInput("the segments have zero length and no duration_s was given")
        min_span = request.smoothing.min_span_s if request.smoothing.HasField("min_span_s") else None
        if min_span is not None and (not math.isfinite(min_span) or min_span < 0):
            raise InvalidInput(f"smoothing.min_span_s {min_span!r} must be a non-negative number")
        return duration

    def _classify(self, request: emotion_pb2.ClassifyRequest, threshold: float, by_duration: bool, by_conf: bool,
                  duration: float, min_span: float) -> tuple[np.ndarray, list[int], list[Span]]:
        assert self.backend is not None
        probs = self.backend.classify([seg.text for seg in request.segments], threshold)
        chosen = [int(np.argmax(p)) for p in probs]
        scored = [Scored(seg.span.start_s, seg.span.end_s, chosen[i], probs[i], weight(seg, by_duration, by_conf))
                  for i, seg in enumerate(request.segments)]
        return probs, chosen, smooth(scored, duration, min_span)

    async def Classify(
        self, request: emotion_pb2.ClassifyRequest, context: aio.ServicerContext
    ) -> emotion_pb2.ClassifyResponse:
        self.require_ready()
        assert self.backend is not None
        with self.limiter:
            duration = self.validate(request)
            opts = request.smoothing
            s = self.settings
            min_span = opts.min_span_s if opts.HasField("min_span_s") else s.min_span_s
            by_duration = opts.weight_by_duration if opts.HasField("weight_by_duration") else s.weight_by_duration
            by_conf = (opts.weight_by_confidence if opts.HasField("weight_by_confidence")
                       else s.weight_by_confidence)
            threshold = opts.neutral_threshold if opts.HasField("neutral_threshold") else s.neutral_threshold

            # Model and smoothing together in a worker thread: both are CPU work.
            probs, chosen, spans = await asyncio.to_thread(
                self._classify, request, threshold, by_duration, by_conf, duration, min_span)
            return emotion_pb2.ClassifyResponse(
                backend=self.backend.name,
                segments=[
                    emotion_pb2.SegmentEmotion(
                        index=i, emotion=index_to_enum(chosen[i]),  # type: ignore[arg-type]
                        probabilities=[emotion_pb2.EmotionProbability(
                            emotion=index_to_enum(k), probability=float(probs[i][k]))  # type: ignore[arg-type]
                            for k in range(len(EMOTIONS))],
                        non_english=seg.language not in ("", "en"),
                    )
                    for i, seg in enumerate(request.segments)
                ],
                spans=[
                    common_pb2.EmotionSpan(emotion=index_to_enum(sp.emotion),  # type: ignore[arg-type]
                                           span=common_pb2.TimeSpan(start_s=sp.start_s, end_s=sp.end_s),
                                           confidence=sp.confidence)
                    for sp in spans
                ],
            )


def weight(seg: emotion_pb2.TextSegment, by_duration: bool, by_confidence: bool) -> float:
    w = 1.0
    if by_duration:
        w *= max(seg.span.end_s - seg.span.start_s, 0.05)
    if by_confidence and seg.HasField("confidence"):
        w *= min(max(seg.confidence, 0.01), 1.0)
    return w


def build() -> Sequence[Servicer]:
    return [EmotionServicer(settings.load(EmotionSettings, vocab.EMOTION.env_prefix),
                           settings.server_settings(vocab.EMOTION.name))]
