"""The SpeechToText gRPC servicer: config, then audio chunks in; segments streamed out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from grpc import aio

from bgm import audio, scratch, settings, vocab
from bgm.chunks import Spool, StreamLimits, read_config
from bgm.errors import ConcurrencyLimiter, InvalidInput
from bgm.limits import LANGUAGE_CODE
from bgm.server import ModelServicer, Servicer
from bgm.settings import ServerSettings
from bgm.threads import iterate_in_thread
from bgm.v1 import stt_pb2, stt_pb2_grpc
from services.stt.backend import SAMPLE_RATE, Detected, Options, Segment, WhisperBackend
from services.stt.settings import SttSettings


class SpeechToTextServicer(ModelServicer, stt_pb2_grpc.SpeechToTextServicer):
    service_name = stt_pb2.DESCRIPTOR.services_by_name["SpeechToText"].full_name

    def __init__(self, stt: SttSettings, server: ServerSettings) -> None:
        super().__init__()
        self.stt = stt
        self.server = server
        self.limiter = ConcurrencyLimiter(server.max_concurrency, "the speech-to-text service")
        self.uploads = ConcurrencyLimiter(server.max_uploads, "the speech-to-text service's uploads")
        self.stream = StreamLimits.of(server, vocab.STT)
        self.backend: WhisperBackend | None = None

    def add_to_server(self, server: aio.Server) -> None:
        stt_pb2_grpc.add_SpeechToTextServicer_to_server(self, server)

    async def load(self) -> None:
        self.backend = await asyncio.to_thread(WhisperBackend, self.stt, self.server.max_concurrency)
        self.ready = True

    def options(self, config: stt_pb2.TranscribeConfig) -> Options:
        audio.check_format(config.format, "config.format")
        language = config.language.strip().lower() or None
        if language is not None and not LANGUAGE_CODE.match(language):
            raise InvalidInput(f"language {config.language!r} is not an ISO 639-1 code such as 'en' or 'de'")
        if config.HasField("beam_size") and not 1 <= config.beam_size <= 16:
            raise InvalidInput(f"beam_size {config.beam_size} is out of range (1..16)")
        return Options(
            task="translate" if config.task == stt_pb2.STT_TASK_TRANSLATE else "transcribe",
            language=language,
            vad_filter=config.vad_filter if config.HasField("vad_filter") else self.stt.vad_filter,
            word_timestamps=(config.word_timestamps if config.HasField("word_timestamps")
                             else self.stt.word_timestamps),
            beam_size=config.beam_size if config.HasField("beam_size") else self.stt.beam_size,
        )

    async def Transcribe(
        self, request_iterator: AsyncIterator[stt_pb2.TranscribeRequest], context: aio.ServicerContext
    ) -> AsyncIterator[stt_pb2.TranscribeResponse]:
        self.require_ready()
        assert self.backend is not None
        self.limiter.check()
        started = time.monotonic()
        setting = f"{vocab.STT.env_prefix}_MAX_DURATION_S"
        # The recording stays on disk and is read a window at a time (``audio.WindowedMono``).
        with scratch.workdir(vocab.STT.name, self.server.tmp_dir) as tmp, \
                Spool(self.server.max_input_bytes, "audio", tmp) as spool:
            with self.uploads:
                config, rest = await read_config(request_iterator, "config", "audio", self.stream)
                options = self.options(config)
                mono = await audio.receive_recording(rest, spool, config.format, SAMPLE_RATE,
                                                     self.server.max_duration_s, setting, Path(tmp))
            async with mono:  # closed off the loop: a file may wait for a reader thread
                with self.limiter:
                    backend = self.backend
                    count = 0
                    async for item in iterate_in_thread(lambda cancel: backend.transcribe(mono, options, cancel)):
                        if isinstance(item, Detected):
                            yield stt_pb2.TranscribeResponse(
                                language=stt_pb2.LanguageInfo(language=item.language, probability=item.probability))
                        else:
                            count += 1
                            yield stt_pb2.TranscribeResponse(segment=segment_message(item))
                    yield stt_pb2.TranscribeResponse(summary=stt_pb2.TranscribeSummary(
                        duration_s=mono.shape[0] / SAMPLE_RATE, segment_count=count, model=backend.name,
                        processing_s=time.monotonic() - started))


def segment_message(seg: Segment) -> stt_pb2.Segment:
    return stt_pb2.Segment(
        id=seg.id, text=seg.text, start_s=seg.start_s, end_s=seg.end_s,
        words=[stt_pb2.Word(text=w.text, start_s=w.start_s, end_s=w.end_s, probability=w.probability)
               for w in seg.words],
        language=seg.language, translated=seg.translated, avg_logprob=seg.avg_logprob,
        no_speech_prob=seg.no_speech_prob, compression_ratio=seg.compression_ratio,
    )


def build() -> Sequence[Servicer]:
    return [SpeechToTextServicer(settings.load(SttSettings, vocab.STT.env_prefix),
                                settings.server_settings(vocab.STT.name))]
