"""One remix: the stages, how they overlap, and how their failures are reported.

    upload -> extract audio -+-> separate (mixer) ----- speech, as it is cleaned -----+
                             |                                                      v
                             +-> mix and mux (mixer), opened at once: original -> [mix] -> video out
                             |                                                      ^
                             +-> transcribe (stt) -> classify (emotion) -> music ---+
                                                                  (as it is composed)

Three strands run at once. The mix takes the original first, then the speech while it is
being separated and the music while it is composed; each track is marked complete so the
mixer prepares it while the others are still coming. What no other stage can overlap is
the mix of the whole, its loudness pass and the encode, once the last input is in.

The speech and the music pass through the gateway (``feed.Supply``): it keeps neither,
so an hour's remix costs the gateway no disk for them, and a retried mix has their stages
made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from grpc import aio

from bgm import audio, cache, logs, media, vocab
from bgm.chunks import CHUNK_BYTES, iter_file_chunks
from bgm.client import RetryPolicy, call_with_retry
from bgm.errors import InvalidInput, ServiceError
from bgm.threads import iterate_in_thread
from bgm.v1 import (
    common_pb2,
    emotion_pb2,
    emotion_pb2_grpc,
    gateway_pb2,
    mixer_pb2,
    mixer_pb2_grpc,
    music_pb2,
    music_pb2_grpc,
    stt_pb2,
    stt_pb2_grpc,
)
from gateway import mixing, sentences
from gateway import timeline as edited_timeline
from gateway.feed import Feed, Supply, first_failure

log = logs.get("bgm.gateway")
T = TypeVar("T")
SEPARATION_RATE = vocab.SEPARATION_RATE
STT_RATE = vocab.STT_RATE
STAGE_NAMES: dict[int, str] = {int(v): k.removeprefix("STAGE_") for k, v in common_pb2.Stage.items()}


# What Separate and Transcribe are sent: mono 16-bit, half the bytes of floats on disk and
# on the wire, and far below anything a listener or Whisper could tell apart.
SEPARATION_FORMAT = audio.audio_format(SEPARATION_RATE, 1, audio.PCM_S16LE)
STT_FORMAT = audio.audio_format(STT_RATE, 1, audio.PCM_S16LE)


@dataclass(frozen=True)
class UploadAudio:
    """The upload's audio. For transcription it is decoded once into a file in the job's
    folder (STT_FORMAT; its length is the decoded duration the limits are checked against),
    removed once transcribed. For separation it is decoded again as it is sent (a retried
    Separate decodes anew: a few seconds an hour), so the 330 MB an hour is at the
    separation rate never lie on the gateway's disk as well as the mixer's."""

    video: Path
    speech_to_text: Path  # STT_FORMAT
    samples: int  # at the separation rate (from the transcription file's length)

    def separation_pcm(self, max_duration_s: float, setting: str) -> Iterator[bytes]:
        """SEPARATION_FORMAT, in chunks, decoded as they are read."""
        return media.decode_pcm(self.video, SEPARATION_RATE, CHUNK_BYTES, "the upload", max_duration_s, setting)


# The mix's fraction follows the speech it takes, and its end (the loudness pass and the
# encode) is a small share of the whole: it is not extrapolated.
UNPACED = {common_pb2.STAGE_MIX}
PACE_FROM = 0.05  # a stage's pace is trusted once this much of it is done


def eta(paces: dict[int, tuple[float, float]], now: float) -> float:
    """Seconds the request is likely still to take: each stage under way at the pace it has
    kept so far (``paces``: stage -> (when it began, fraction done)), the slowest deciding;
    0 while none is far enough along to tell."""
    left = [(now - began) * (1.0 - done) / done for stage, (began, done) in paces.items()
            if stage not in UNPACED and PACE_FROM <= done < 1.0]
    return max(left, default=0.0)


def with_music_defaults(timeline: gateway_pb2.EmotionTimeline, music: music_pb2.MusicStyle) -> None:
    """The whole video's style and intensity, written into each span that sets none: the
    timeline handed back (and edited) then re-renders the same music."""
    for span in timeline.spans:
        if music.style and not span.control.style:
            span.control.style = music.style
        if music.HasField("intensity") and not span.control.HasField("intensity"):
            span.control.intensity = music.intensity


def word_spans(transcript: gateway_pb2.Transcript) -> mixer_pb2.SpeechSpans:
    """When each word is said (segments span pauses too, so only word timings are used), in
    one message: as many standalone TimeSpan messages they took 4.9 MiB an hour, this 0.3."""
    spans = mixer_pb2.SpeechSpans()
    for segment in transcript.segments:
        for word in segment.words:
            spans.spans.add(start_s=word.start_s, end_s=word.end_s)
    return spans


# The service each remote stage calls, so that an unreachable one is named.
STAGE_SERVICES: dict[int, str] = {
    common_pb2.STAGE_SEPARATE: vocab.MIXER.name, common_pb2.STAGE_TRANSCRIBE: vocab.STT.name,
    common_pb2.STAGE_CLASSIFY: vocab.EMOTION.name, common_pb2.STAGE_GENERATE_MUSIC: vocab.MUSIC.name,
    common_pb2.STAGE_MIX: vocab.MIXER.name,
}


class StageFailed(ServiceError):
    """A stage's RPC failed; carries the stage's status code and names the stage (and, when
    it cannot be reached, the service)."""

    def __init__(self, stage: int, code: grpc.StatusCode, detail: str) -> None:
        if code == grpc.StatusCode.UNAVAILABLE and stage in STAGE_SERVICES:
            detail = f"the {STAGE_SERVICES[stage]} service is unavailable (retried, then gave up): {detail}"
        super().__init__(f"stage {STAGE_NAMES.get(stage, stage)} failed: {detail}")
        self.code = code
        self.stage = stage


@dataclass
class Stubs:
    stt: stt_pb2_grpc.SpeechToTextStub
    emotion: emotion_pb2_grpc.EmotionClassifierStub
    music: music_pb2_grpc.MusicGeneratorStub
    mixer: mixer_pb2_grpc.MixerStub

    @classmethod
    def connect(cls, channels: dict[str, aio.Channel]) -> Stubs:
        return cls(
            stt=stt_pb2_grpc.SpeechToTextStub(channels[vocab.STT.name]),
            emotion=emotion_pb2_grpc.EmotionClassifierStub(channels[vocab.EMOTION.name]),
            music=music_pb2_grpc.MusicGeneratorStub(channels[vocab.MUSIC.name]),
            mixer=mixer_pb2_grpc.MixerStub(channels[vocab.MIXER.name]),
        )


Emit = Callable[[gateway_pb2.RemixResponse], Awaitable[None]]


@dataclass
class Remix:
    stubs: Stubs
    options: gateway_pb2.RemixOptions
    video: Path
    work: Path
    emit: Emit
    timeout_s: float
    retry: RetryPolicy
    max_duration_s: float = 3 * 3600.0
    audio_cache: cache.ArrayCache | None = None
    started: float = field(default_factory=time.monotonic)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    paces: dict[int, tuple[float, float]] = field(default_factory=dict)  # stage: (began, fraction)
    _digest: str | None = None  # the upload's content (``upload_digest``)
    music_stem: mixing.Music | None = None  # the score as composed, when its stem is asked for

    # ----- helpers ----------------------------------------------------------------
    async def progress(self, stage: int, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        self.paces[stage] = (self.paces.get(stage, (now, 0.0))[0], fraction)
        await self.emit(gateway_pb2.RemixResponse(progress=common_pb2.Progress(
            stage=stage, fraction=fraction, elapsed_s=now - self.started,  # type: ignore[arg-type]
            message=message, eta_s=eta(self.paces, now))))

    async def stage(self, stage: int, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run one stage: retried on UNAVAILABLE, timed, and any failure named by stage."""
        await self.progress(stage, 0.0)
        began = time.monotonic()
        try:
            result = await call_with_retry(attempt, self.retry, STAGE_NAMES[stage])
        except aio.AioRpcError as exc:
            raise StageFailed(stage, exc.code(), exc.details() or exc.code().name) from None
        self.stage_seconds[STAGE_NAMES[stage].lower()] = time.monotonic() - began
        await self.progress(stage, 1.0)
        return result

    # ----- stages -----------------------------------------------------------------
    async def extract(self, probed: asyncio.Future[media.MediaInfo] | None = None
                      ) -> tuple[media.MediaInfo, UploadAudio | None]:
        """The upload's duration (handed to ``probed`` as soon as it is measured, and an edited
        timeline checked against it before anything else), then its audio."""
        await self.progress(common_pb2.STAGE_EXTRACT_AUDIO, 0.0)
        began = time.monotonic()
        setting = f"{vocab.GATEWAY.env_prefix}_MAX_DURATION_S"
        info = await asyncio.to_thread(self.probed, setting)
        if info.duration_s <= 0:
            raise InvalidInput("the upload has zero length")
        if self.options.HasField("timeline"):  # before any work: a timeline that does not fit is refused
            edited_timeline.fit_to_duration(self.options.timeline.spans, info.duration_s)
        if probed is not None:
            probed.set_result(info)
        upload = None
        if info.has_audio:
            upload = await asyncio.to_thread(self.decoded_audio, setting)
        self.stage_seconds["extract_audio"] = time.monotonic() - began
        await self.progress(common_pb2.STAGE_EXTRACT_AUDIO, 1.0)
        return info, upload

    def upload_digest(self) -> str:
        if self._digest is None:
            self._digest = cache.file_digest(self.video)
        return self._digest

    def probed(self, setting: str) -> media.MediaInfo:
        """What the upload holds: from the cache when this same file was probed before under
        the same duration limit (a re-render starts its music that much sooner), else probed."""
        store = self.audio_cache
        if store is None or store.folder is None:
            return media.probe(self.video, "the upload", self.max_duration_s, setting)
        name = cache.key("upload-probe", self.upload_digest(), self.max_duration_s)
        kept = store.get(name)
        if kept is not None:
            with contextlib.suppress(ValueError, TypeError):
                return media.MediaInfo(**json.loads(kept.tobytes()))
        info = media.probe(self.video, "the upload", self.max_duration_s, setting)
        store.put(name, np.frombuffer(json.dumps(dataclasses.asdict(info)).encode(), dtype=np.uint8))
        return info

    def decoded_audio(self, setting: str) -> UploadAudio:
        """The upload's audio for transcription in a file: from the cache when this same file
        was decoded before (and still fits the duration limit), else decoded."""
        stt = self.work / "upload-stt.s16"
        store = self.audio_cache
        name = ""
        frames = 0
        if store is not None and store.folder is not None:
            name = cache.key("upload-audio", "s16", STT_RATE, self.upload_digest())
            if store.get_file(name, stt):
                frames = stt.stat().st_size // audio.bytes_per_frame(STT_FORMAT)
                if frames > self.max_duration_s * STT_RATE + 1:
                    frames = 0
        if not frames:
            frames = media.decode_audio_to_files(self.video, [(stt, STT_RATE)], "the upload", self.max_duration_s,
                                                 setting)
            if name and store is not None:
                store.put_file(name, stt)
        return UploadAudio(self.video, stt, frames * (SEPARATION_RATE // STT_RATE))

    async def transcribe(self, upload: UploadAudio | None, duration: float) -> gateway_pb2.Transcript:
        transcript = gateway_pb2.Transcript(duration_s=duration)
        if upload is None:
            return transcript
        config = stt_pb2.TranscribeConfig(format=STT_FORMAT, task=self.options.task, language=self.options.language)

        async def requests() -> AsyncIterator[stt_pb2.TranscribeRequest]:
            yield stt_pb2.TranscribeRequest(config=config)
            for piece in iter_file_chunks(upload.speech_to_text, CHUNK_BYTES):
                yield stt_pb2.TranscribeRequest(audio=piece)

        async def attempt() -> gateway_pb2.Transcript:
            result = gateway_pb2.Transcript(duration_s=duration)
            async for event in self.stubs.stt.Transcribe(requests(), timeout=self.timeout_s):
                kind = event.WhichOneof("event")
                if kind == "language":
                    result.language = event.language.language
                    result.language_probability = event.language.probability
                elif kind == "segment":
                    result.segments.append(event.segment)
                    await self.progress(common_pb2.STAGE_TRANSCRIBE, min(0.99, event.segment.end_s / duration),
                                        event.segment.text[:80])
            return result

        transcript = await self.stage(common_pb2.STAGE_TRANSCRIBE, attempt)
        upload.speech_to_text.unlink(missing_ok=True)
        return transcript

    async def separate(self, upload: UploadAudio, speech: Feed,
                       speech_format: asyncio.Future[common_pb2.AudioFormat]) -> None:
        """Separate the speech, handing it to ``speech`` as the mixer streams it back."""
        config = mixer_pb2.SeparateConfig(format=SEPARATION_FORMAT, backend=self.options.separation_backend,
                                          stems=[mixer_pb2.STEM_SPEECH])

        setting = f"{vocab.GATEWAY.env_prefix}_MAX_DURATION_S"

        async def requests() -> AsyncIterator[mixer_pb2.SeparateRequest]:
            yield mixer_pb2.SeparateRequest(config=config)
            async for piece in iterate_in_thread(lambda _: upload.separation_pcm(self.max_duration_s, setting)):
                yield mixer_pb2.SeparateRequest(audio=piece)

        async def attempt() -> None:
            offset = 0  # a retried attempt starts over; the feed keeps only what is new
            async for event in self.stubs.mixer.Separate(requests(), timeout=self.timeout_s):
                kind = event.WhichOneof("event")
                if kind == "header" and not speech_format.done():
                    speech_format.set_result(event.header.format)
                elif kind == "chunk" and event.chunk.stem == mixer_pb2.STEM_SPEECH:
                    await speech.write_at(offset, event.chunk.data)
                    offset += len(event.chunk.data)
                elif kind == "progress":
                    await self.progress(common_pb2.STAGE_SEPARATE, min(0.99, event.progress.fraction))
            if not speech_format.done():
                raise InvalidInput("the mixer returned no stems header")

        try:
            await self.stage(common_pb2.STAGE_SEPARATE, attempt)
        except BaseException as exc:
            await speech.close(exc)
            raise
        await speech.close()

    async def classify(self, transcript: gateway_pb2.Transcript) -> gateway_pb2.EmotionTimeline:
        request = emotion_pb2.ClassifyRequest(duration_s=transcript.duration_s, smoothing=self.options.smoothing)
        confidence = {i: float(np.exp(seg.avg_logprob)) for i, seg in enumerate(transcript.segments)}
        for sentence in sentences.split(list(transcript.segments), confidence):
            request.segments.append(emotion_pb2.TextSegment(
                text=sentence.text, span=common_pb2.TimeSpan(start_s=sentence.start_s, end_s=sentence.end_s),
                confidence=sentence.confidence, language=sentence.language))

        async def attempt() -> gateway_pb2.EmotionTimeline:
            reply = await self.stubs.emotion.Classify(request, timeout=self.timeout_s)
            return gateway_pb2.EmotionTimeline(segments=reply.segments, spans=reply.spans, backend=reply.backend,
                                               sentences=request.segments)

        return await self.stage(common_pb2.STAGE_CLASSIFY, attempt)

    def music(self, timeline: gateway_pb2.EmotionTimeline) -> Supply:
        """The score, handed on as it streams in, in the mix's format; written to the job's
        folder only for its stem (an hour of it is 0.7 GB raw, FLAC when 16-bit: about half)."""
        request = music_pb2.GenerateRequest(spans=timeline.spans, style=self.options.music,
                                            format=mixing.BGM_FORMAT)
        stem = mixer_pb2.STEM_MUSIC in self.options.mix.return_stems
        announced = False

        async def produce(feed: Feed, fmt: asyncio.Future[common_pb2.AudioFormat]) -> None:
            score: mixing.Music | None = None  # the stem's copy

            async def attempt() -> None:
                nonlocal announced, score
                offset, total = 0, 0  # a retry starts over; the feed keeps only what is new
                async for event in self.stubs.music.Generate(request, timeout=self.timeout_s):
                    kind = event.WhichOneof("event")
                    if kind == "header":
                        if not fmt.done():
                            fmt.set_result(event.header.format)
                        total = event.header.total_samples
                        if not announced:
                            announced = True
                            await self.emit(gateway_pb2.RemixResponse(score=event.header))
                        if stem and score is None:
                            score = mixing.Music(self.work, event.header.format)
                    elif kind == "chunk":
                        if not fmt.done():
                            raise InvalidInput("the music service sent audio before its header")
                        new = await feed.write_at(offset, event.chunk.pcm)
                        offset += len(event.chunk.pcm)
                        if score is not None and new:
                            await score.append(new)
                        if total:
                            frames = len(event.chunk.pcm) // audio.bytes_per_frame(fmt.result())
                            done = event.chunk.start_sample + frames
                            await self.progress(common_pb2.STAGE_GENERATE_MUSIC, min(0.99, done / total))
                if not fmt.done():
                    raise InvalidInput("the music service returned no header")

            try:
                await self.stage(common_pb2.STAGE_GENERATE_MUSIC, attempt)
                if score is not None:
                    await asyncio.to_thread(score.finish)
            except BaseException as exc:
                if score is not None:
                    await asyncio.to_thread(score.close)
                await feed.close(exc)
                raise
            await feed.close()
            if score is not None:  # a retried mix made the score again
                if self.music_stem is not None:
                    await asyncio.to_thread(self.music_stem.close)
                self.music_stem = score

        return Supply(produce)

    async def mix(self, inputs: mixing.MixInputs) -> None:
        """MixAndMux, opened at once (``gateway.mixing`` builds the stream and collects the
        answer); the finished video is handed on to the client."""
        output = self.work / "remixed.bin"

        async def progress(fraction: float, message: str) -> None:
            await self.progress(common_pb2.STAGE_MIX, fraction, message)

        async def attempt() -> list[gateway_pb2.RemixResponse]:
            inputs.again()  # a retry: what the last attempt took is made again (nothing on the first)
            broken: list[Exception] = []  # a stage feeding the mix failed

            async def sent() -> AsyncIterator[mixer_pb2.MixRequest]:
                try:
                    async for request in mixing.requests(inputs, progress):
                        yield request
                except Exception as exc:
                    broken.append(exc)
                    raise

            call = self.stubs.mixer.MixAndMux(sent(), timeout=self.timeout_s)
            try:
                return await mixing.collect(call, output)
            except (asyncio.CancelledError, aio.AioRpcError):
                # gRPC cancels a call whose requests raised: the stage's own error is the news.
                if broken:
                    raise broken[0] from None
                raise

        held = await self.stage(common_pb2.STAGE_MIX, attempt)
        for message in mixing.handed_on(held, output):
            await self.emit(message)
        if self.music_stem is not None:
            score = self.music_stem  # the stem is written and sent a piece at a time
            async for message in iterate_in_thread(lambda _: mixing.music_stem(score, self.work)):
                await self.emit(message)

    # ----- the whole job -----------------------------------------------------------
    async def analyse(self, upload: UploadAudio | None, duration: float,
                      spoken: asyncio.Future[mixer_pb2.SpeechSpans] | None = None) -> gateway_pb2.EmotionTimeline:
        transcript = await self.transcribe(upload, duration)
        if spoken is not None:
            spoken.set_result(word_spans(transcript))
        await self.emit(gateway_pb2.RemixResponse(transcript=transcript))
        timeline = await self.classify(transcript)
        with_music_defaults(timeline, self.options.music)
        await self.emit(gateway_pb2.RemixResponse(timeline=timeline))
        return timeline

    async def given(self, duration: float,
                    spoken: asyncio.Future[mixer_pb2.SpeechSpans] | None = None) -> gateway_pb2.EmotionTimeline:
        """An edited timeline from the options, in place of transcription and classification:
        its transcript (if any) is sent back and steers the ducking as a real one would."""
        transcript = gateway_pb2.Transcript()
        transcript.CopyFrom(self.options.timeline.transcript)
        transcript.duration_s = duration
        if spoken is not None:
            spoken.set_result(word_spans(transcript))
        await self.emit(gateway_pb2.RemixResponse(transcript=transcript))
        timeline = gateway_pb2.EmotionTimeline(spans=self.options.timeline.spans, backend="edited")
        with_music_defaults(timeline, self.options.music)
        await self.emit(gateway_pb2.RemixResponse(timeline=timeline))
        return timeline

    async def run(self, analyze_only: bool) -> None:
        edited = self.options.HasField("timeline")
        loop = asyncio.get_running_loop()
        probed: asyncio.Future[media.MediaInfo] = loop.create_future()
        music: asyncio.Future[Supply] = loop.create_future()
        spoken: asyncio.Future[mixer_pb2.SpeechSpans] = loop.create_future()

        async def compose_edited() -> None:
            # An edited timeline needs only the duration: its music starts while the audio decodes.
            info = await asyncio.shield(probed)
            music.set_result(self.music(await self.given(info.duration_s, spoken)))

        early = asyncio.ensure_future(compose_edited()) if edited and not analyze_only else None
        try:
            info, upload = await self.extract(probed)
        except BaseException:
            if early is not None:
                early.cancel()
                await asyncio.gather(early, return_exceptions=True)
            if music.done() and not music.cancelled():
                await music.result().close()
            raise
        if analyze_only:
            await (self.given(info.duration_s) if edited else self.analyse(upload, info.duration_s))
            return
        # The separated speech goes on to the mix as it comes.
        speech = None if upload is None else Supply(lambda feed, fmt: self.separate(upload, feed, fmt))

        async def analyse_and_compose() -> None:
            music.set_result(self.music(await self.analyse(upload, info.duration_s, spoken)))

        # Two strands at once besides separation (which the mix's stream reads from, and whose
        # failure reaches it there): the mix itself, and transcription -> emotions -> music (or
        # an edited timeline's music), which the mix picks up when it begins.
        strands = [asyncio.ensure_future(self.mix(mixing.MixInputs(
                       self.video, self.options, speech, 0 if upload is None else upload.samples, music, spoken))),
                   early if early is not None else asyncio.ensure_future(analyse_and_compose())]
        try:
            await first_failure(strands)
        finally:
            for strand in strands:
                strand.cancel()
            await asyncio.gather(*strands, return_exceptions=True)
            supplies = [s for s in (speech, music.result() if music.done() and not music.cancelled() else None)
                        if s is not None]
            await asyncio.gather(*(s.close() for s in supplies))
            if self.music_stem is not None:  # off the loop: closing a FLAC file waits for its readers
                await asyncio.shield(asyncio.to_thread(self.music_stem.close))
        log.info("remix done", extra={"fields": {
            "duration_s": info.duration_s, "wall_s": round(time.monotonic() - self.started, 2),
            "stages_s": {k: round(v, 2) for k, v in self.stage_seconds.items()}}})
