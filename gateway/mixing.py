"""The MixAndMux call of a remix, as named steps: what goes in (the original, then the
speech as it is separated, the words' times, then the music as it is composed, each track
marked when complete) and what comes back (the remixed file, its result and any stems).

Each step is a module function over plain inputs, so each can be tested on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgm import audio, flac, vocab
from bgm.chunks import iter_chunks, iter_file_chunks
from bgm.v1 import common_pb2, gateway_pb2, mixer_pb2
from gateway.feed import Feed, Supply, merge

# The score as the music service is asked for it and the mixer is sent it: 48 kHz (the
# mix's rate: nothing to resample) stereo 16-bit (the music peaks at 0.89, and an hour of it
# is 0.7 GB on disk, against 1.4 GB as floats).
BGM_FORMAT = audio.audio_format(vocab.SEPARATION_RATE, 2, audio.PCM_S16LE)
# Inside any idle timeout an operator would set (the default is 60 s): the messages are tiny.
KEEP_ALIVE_S = 2.0
Progress = Callable[[float, str], Awaitable[None]]


class Music:
    """The score as the music service streamed it in, on disk in the job's folder, kept
    for its stem (STEM_MUSIC) only: FLAC when it is 16-bit (about half the bytes: an hour
    is some 310 MiB, not 659), else raw."""

    def __init__(self, work: Path, fmt: common_pb2.AudioFormat) -> None:
        self.fmt = fmt
        self.flac = flac.FlacPcm(work / "music.flac", fmt) if flac.fits(fmt) else None
        self.path = self.flac.path if self.flac is not None else work / "music.pcm"
        self._raw = None if self.flac is not None else open(self.path, "wb")  # noqa: SIM115 - closed in finish/close

    async def append(self, pcm: bytes) -> None:
        if self.flac is not None:
            await self.flac.append(pcm)
        elif self._raw is not None:
            self._raw.write(pcm)

    def finish(self) -> None:
        if self.flac is not None:
            self.flac.finish()
        elif self._raw is not None:
            self._raw.close()

    def pcm(self) -> Iterator[bytes]:
        """The score's raw PCM, in chunks."""
        return self.flac.iter_pcm() if self.flac is not None else iter_file_chunks(self.path)

    def close(self) -> None:
        """Remove the score (its file goes with the job's folder otherwise)."""
        if self.flac is not None:
            self.flac.close()
        else:
            if self._raw is not None:
                self._raw.close()
            self.path.unlink(missing_ok=True)


@dataclass
class MixInputs:
    """What the mix takes; the futures are shared with the stages that fill them."""

    video: Path
    options: gateway_pb2.RemixOptions
    speech: Supply | None  # None when the upload has no audio
    speech_samples: int
    music: asyncio.Future[Supply]
    spoken: asyncio.Future[mixer_pb2.SpeechSpans]

    def again(self) -> None:
        """Before a retried mix: the speech and the music start over where the last attempt
        took some (the gateway keeps neither)."""
        if self.speech is not None:
            self.speech.again()
        if self.music.done() and not self.music.cancelled() and self.music.exception() is None:
            self.music.result().again()


def track(kind: int, pieces: Iterable[bytes]) -> Iterator[mixer_pb2.MixRequest]:
    """One track's chunks, then its ``last`` marker."""
    for piece in pieces:
        yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=kind, data=piece))  # type: ignore[arg-type]
    yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=kind, last=True))  # type: ignore[arg-type]


async def speech_track(speech: Feed | None, total_bytes: int,
                       progress: Progress) -> AsyncIterator[mixer_pb2.MixRequest]:
    """The speech as the separator hands it over (none: no audio); the mix's progress runs
    to 90 % meanwhile."""
    sent = 0
    if speech is not None:
        async for piece in speech.read():
            for sub in iter_chunks(piece):
                yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=mixer_pb2.TRACK_SPEECH, data=sub))
            sent += len(piece)
            await progress(0.9 * min(1.0, sent / max(1, total_bytes)), "taking the speech as it is separated")
    yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=mixer_pb2.TRACK_SPEECH, last=True))


async def keep_alive(result: asyncio.Future[Any]) -> AsyncIterator[mixer_pb2.MixRequest]:
    """Empty SpeechSpans (no words: nothing to the mix) every KEEP_ALIVE_S until ``result``
    is done: the mixer drops a stream silent for its idle timeout (60 s), and slow music
    (Riffusion on a CPU, a long programme) or a long transcription can take longer than
    that after the speech has all been sent. Waiting does not cancel ``result``, which a
    retry shares."""
    while not result.done():
        await asyncio.wait({result}, timeout=KEEP_ALIVE_S)
        if not result.done():
            yield mixer_pb2.MixRequest(speech_spans=mixer_pb2.SpeechSpans())


async def music_track(spoken: asyncio.Future[mixer_pb2.SpeechSpans],
                      music: asyncio.Future[Supply]) -> AsyncIterator[mixer_pb2.MixRequest]:
    """The words' times (speech the mixer's voice-activity detector may miss still ducks the
    music), then the music in the mix's format as it is composed."""
    async for request in keep_alive(spoken):
        yield request
    words = spoken.result()
    if words.spans:
        yield mixer_pb2.MixRequest(speech_spans=words)
    async for request in keep_alive(music):
        yield request
    score = music.result()
    foreign: list[bytes] = []  # another music service may answer in its own format
    async for piece in score.feed.read(KEEP_ALIVE_S):
        if not piece:  # a span that takes long to render (Riffusion on a CPU)
            yield mixer_pb2.MixRequest(speech_spans=mixer_pb2.SpeechSpans())
        elif score.fmt.result() == BGM_FORMAT:  # known before the first piece
            for sub in iter_chunks(piece):
                yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=mixer_pb2.TRACK_BGM, data=sub))
        else:
            foreign.append(piece)
    if foreign:
        fmt = score.fmt.result()
        pcm = await asyncio.to_thread(lambda: audio.convert_pcm(b"".join(foreign), fmt, vocab.SEPARATION_RATE, 2,
                                                                BGM_FORMAT.encoding))
        for request in track(mixer_pb2.TRACK_BGM, iter_chunks(pcm)):
            yield request
        return
    yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=mixer_pb2.TRACK_BGM, last=True))


def config(options: gateway_pb2.RemixOptions, speech_format: common_pb2.AudioFormat | None) -> mixer_pb2.MixConfig:
    made = mixer_pb2.MixConfig(options=options.mix, original_name=options.filename or "upload.mp4",
                               bgm_format=BGM_FORMAT)
    # The music stem is the gateway's own (it has the music); the mixer makes the others.
    kept = [s for s in made.options.return_stems if s != mixer_pb2.STEM_MUSIC]
    del made.options.return_stems[:]
    made.options.return_stems.extend(kept)
    if speech_format is not None:
        made.speech_format.CopyFrom(speech_format)
    return made


async def requests(inputs: MixInputs, progress: Progress) -> AsyncIterator[mixer_pb2.MixRequest]:
    """The whole request stream: config, the original, then speech and music as they come."""
    speech = inputs.speech
    speech_format = await asyncio.shield(speech.fmt) if speech is not None else None
    yield mixer_pb2.MixRequest(config=config(inputs.options, speech_format))
    for request in track(mixer_pb2.TRACK_ORIGINAL, iter_file_chunks(inputs.video)):
        yield request
    total = inputs.speech_samples * audio.bytes_per_frame(speech_format) if speech_format is not None else 0
    async for request in merge(speech_track(None if speech is None else speech.feed, total, progress),
                               music_track(inputs.spoken, inputs.music)):
        yield request
    await progress(0.9, "mixing, measuring loudness and encoding")


async def collect(responses: AsyncIterator[mixer_pb2.MixResponse], output: Path) -> list[gateway_pb2.RemixResponse]:
    """The remixed file into ``output``; its result and stems held back, to be sent on only
    once the mix has finished (a retried attempt then never sends half a file twice)."""
    held: list[gateway_pb2.RemixResponse] = []
    with open(output, "wb") as f:
        async for event in responses:
            kind = event.WhichOneof("event")
            if kind == "result":
                held.append(gateway_pb2.RemixResponse(result=event.result))
            elif kind == "media":
                f.write(event.media)
            elif kind == "stem":
                held.append(gateway_pb2.RemixResponse(stem=event.stem))
    return held


def music_stem(score: Music, work: Path) -> Iterator[gateway_pb2.RemixResponse]:
    """The music as generated, as a WAV file in chunks (STEM_MUSIC): 16-bit like the other
    stems when the score is (an hour of floats would be 1.4 GB), written a piece at a time."""
    import soundfile

    fmt = score.fmt
    path = work / "music.wav"
    subtype = "PCM_16" if fmt.encoding == audio.PCM_S16LE else "FLOAT"
    with soundfile.SoundFile(path, "w", fmt.sample_rate_hz, fmt.channels, subtype=subtype) as wav:
        for data in score.pcm():
            wav.write(audio.pcm_to_float(data, fmt))
    try:
        for piece in iter_file_chunks(path):
            yield gateway_pb2.RemixResponse(stem=mixer_pb2.StemChunk(stem=mixer_pb2.STEM_MUSIC, data=piece))
    finally:
        path.unlink(missing_ok=True)


def handed_on(held: list[gateway_pb2.RemixResponse], output: Path) -> Iterator[gateway_pb2.RemixResponse]:
    """What the client gets from a finished mix: the result, the video, then the stems."""
    yield from (m for m in held if m.WhichOneof("event") == "result")
    for piece in iter_file_chunks(output):
        yield gateway_pb2.RemixResponse(video=piece)
    yield from (m for m in held if m.WhichOneof("event") == "stem")
