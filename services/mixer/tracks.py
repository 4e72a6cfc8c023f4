"""The three tracks of one MixAndMux call, each prepared as soon as it has fully arrived.

A caller that marks a track's final chunk (``TrackChunk.last``) lets the mixer probe the
original and measure the music while the speech is still being separated, so what is left
once the last track lands is only the mix itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgm import cache, flac, limits, media, vocab
from bgm.chunks import Spool
from bgm.errors import InvalidInput
from bgm.loudness import loudness_of_blocks
from bgm.v1 import common_pb2, mixer_pb2
from services.mixer import activity, render, sources
from services.mixer.following import FollowingVad

RATE = sources.RATE
DURATION_SETTING = f"{vocab.MIXER.env_prefix}_MAX_DURATION_S"
TRACK_NAMES: dict[int, str] = {
    mixer_pb2.TRACK_ORIGINAL: "original", mixer_pb2.TRACK_SPEECH: "speech", mixer_pb2.TRACK_BGM: "bgm"}


@dataclass(frozen=True)
class Original:
    info: media.MediaInfo
    samples: int  # the mix's length at 48 kHz


@dataclass(frozen=True)
class Speech:
    source: sources.Source
    probability: np.ndarray  # the VAD's speech probability per 32 ms window


@dataclass(frozen=True)
class Music:
    source: sources.Source
    level_lufs: float
    digests: np.ndarray | None = None  # per ``render.UNIT``, where asked for (``reprise``)


Vad = Callable[[str, Callable[[], np.ndarray]], np.ndarray]


def uncached(key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    return compute()


def _voice_loudness(speech: Speech, threshold: float, n: int, words: list[tuple[float, float]]
                    ) -> render.VoiceLoudness:
    return render.voice_loudness(speech.source, activity.talking(speech.probability, threshold, n, words))


class TrackSet:
    def __init__(self, config: mixer_pb2.MixConfig, limit: int, tmp: str, max_duration_s: float,
                 threshold: float, vad: Vad = uncached, digest_music: bool = False) -> None:
        suffix = limits.file_suffix(config.original_name, "original_name")
        self.config = config
        self.limit = limit
        self.max_duration_s = max_duration_s
        self.scratch = Path(tmp)
        # ``vad(key, compute)``: the speech's VAD, named by a key of the speech as sent
        # (the servicer keeps it: a re-render sends the same speech again).
        self.vad = vad
        self.digest_music = digest_music  # the music digested per unit as it is measured
        self.speech_digest = hashlib.sha256()
        self.following: FollowingVad | None = None
        self.spools = {track: Spool(limit, name, tmp, suffix if name == "original" else "")
                       for track, name in TRACK_NAMES.items()}
        # 16-bit speech and music at the mix's rate (what the gateway sends) are kept as FLAC
        # as they arrive: an hour's music is 305 MiB so, not 659, its speech some 110, not 330.
        formats = {mixer_pb2.TRACK_SPEECH: config.speech_format, mixer_pb2.TRACK_BGM: config.bgm_format}
        self.flacs: dict[int, flac.FlacSegments] = {
            track: flac.FlacSegments(self.scratch, TRACK_NAMES[track], fmt)
            for track, fmt in formats.items() if sources.kept_as_flac(fmt)}
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        # The proto lets tracks complete in any order; speech and music wait for the
        # original's length through this, whenever it arrives.
        self.original: asyncio.Future[Original] = asyncio.get_running_loop().create_future()
        self.words: list[tuple[float, float]] = []  # when words are said (seconds)
        # The gated speech's loudness, measured once the speech is in (and again when words
        # come after it) while the music is still on its way: the mix uses it if the speech
        # activity it was measured for is still the one it mixes with.
        self.threshold = threshold
        self.voice: render.VoiceLoudness | None = None
        self.measuring: asyncio.Task[None] | None = None
        self.words_changed = False

    def close_audio(self) -> None:
        """Remove the speech and the music (once the mix is encoded and no stem needs them);
        the original stays for the mux."""
        for track, spool in self.spools.items():
            if track != mixer_pb2.TRACK_ORIGINAL:
                spool.close()
        for store in self.flacs.values():
            store.close()

    def close(self) -> None:
        if self.following is not None:
            self.following.stop()
        if not self.original.done():
            self.original.cancel()
        if self.measuring is not None and not self.measuring.done():
            self.measuring.cancel()
        for task in self.tasks.values():
            if task.done():
                if not task.cancelled():
                    task.exception()  # retrieved: the failure that matters was already raised
            else:
                task.cancel()
        for spool in self.spools.values():
            spool.close()
        for store in self.flacs.values():
            store.close()

    async def receive(self, rest: AsyncIterator[mixer_pb2.MixRequest]) -> None:
        total = 0
        async for message in rest:
            kind = message.WhichOneof("payload")
            if kind == "speech_spans":
                self.add_words(message.speech_spans)
                continue
            if kind != "chunk":
                raise InvalidInput("'config' was sent twice; send it once, as the first message")
            chunk = message.chunk
            if chunk.track not in self.spools:
                raise InvalidInput(f"chunk for unknown track {chunk.track}; use ORIGINAL, SPEECH or BGM")
            if chunk.track in self.tasks:
                raise InvalidInput(f"a {TRACK_NAMES[chunk.track]} chunk came after that track's last chunk")
            total += len(chunk.data)
            if total > self.limit:
                raise InvalidInput(f"the upload is larger than the limit of {self.limit} bytes")
            if chunk.track in self.flacs:
                await self.flacs[chunk.track].append(chunk.data)
            else:
                self.spools[chunk.track].write(chunk.data)
            if chunk.track == mixer_pb2.TRACK_SPEECH:
                self.speech_digest.update(chunk.data)
                self._follow_speech()
            if chunk.last:
                self.prepare(chunk.track)
        for track in self.spools:
            if track not in self.tasks:
                self.prepare(track)

    def _follow_speech(self) -> None:
        """The VAD told how far the speech has landed (started once the original's length is
        known, for speech read where it lies)."""
        spool, store = self.spools[mixer_pb2.TRACK_SPEECH], self.flacs.get(mixer_pb2.TRACK_SPEECH)
        if self.following is None:
            fmt = self.config.speech_format
            if (not self.original.done() or self.original.cancelled() or self.original.exception() is not None
                    or not sources.read_in_place(fmt)):
                return
            n = self.original.result().samples
            if store is not None:
                self.following = FollowingVad(lambda _: sources.FlacTrack(store, n), n)
            else:
                self.following = FollowingVad(lambda written: sources.PcmFile(spool.path, fmt, n, written=written), n)
        if store is not None:
            self.following.grew(store.size)
            return
        spool.flush()
        self.following.grew(spool.size)

    def add_words(self, spans: mixer_pb2.SpeechSpans) -> None:
        for i, span in enumerate(spans.spans):
            start, end = span.start_s, span.end_s
            if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
                raise InvalidInput(f"speech_spans {i}: ({start:g}, {end:g}) is not a time span in seconds")
            self.words.append((start, end))
        if spans.spans:
            self._measure_voice()

    def prepare(self, track: int) -> None:
        self.spools[track].finish()  # a FLAC track is finished by its step (``_source``), off the loop
        steps: dict[int, Callable[[], Coroutine[Any, Any, object]]] = {
            mixer_pb2.TRACK_ORIGINAL: self._original, mixer_pb2.TRACK_SPEECH: self._speech,
            mixer_pb2.TRACK_BGM: self._music}
        self.tasks[track] = asyncio.ensure_future(steps[track]())

    async def _original(self) -> Original:
        try:
            original = await self._probe_original()
        except BaseException as exc:
            if not self.original.done():
                self.original.set_exception(exc)
                self.original.exception()  # retrieved: raised through the task as well
            raise
        self.original.set_result(original)
        return original

    async def _probe_original(self) -> Original:
        spool = self.spools[mixer_pb2.TRACK_ORIGINAL]
        if spool.size == 0:
            raise InvalidInput("no ORIGINAL track was sent: the original media file is needed to mux into")
        info = await asyncio.to_thread(media.probe, spool.path, "the original", self.max_duration_s, DURATION_SETTING)
        if info.duration_s <= 0:
            raise InvalidInput("the original has zero length")
        return Original(info, round(info.duration_s * RATE))

    def _source(self, track: int, fmt: common_pb2.AudioFormat, n: int) -> sources.Source:
        store = self.flacs.get(track)
        if store is not None:
            store.finish()
            if store.size == 0:
                return sources.Silence(n)
            sources.check_length(store.size, fmt, TRACK_NAMES[track], self.max_duration_s, DURATION_SETTING)
            return sources.FlacTrack(store, n)
        spool = self.spools[track]
        return sources.open_track(spool.path, spool.size, fmt, n, TRACK_NAMES[track], self.max_duration_s,
                                  DURATION_SETTING, self.scratch)

    async def _speech(self) -> Speech:
        n = (await asyncio.shield(self.original)).samples

        fmt = self.config.speech_format
        key = cache.key("vad", RATE, n, fmt.encoding, fmt.sample_rate_hz, fmt.channels,
                        self.speech_digest.hexdigest())
        following = self.following

        def work() -> Speech:
            source = self._source(mixer_pb2.TRACK_SPEECH, fmt, n)
            if following is None:
                return Speech(source, self.vad(key, lambda: activity.speech_probability_of(source)))
            try:
                return Speech(source, self.vad(key, lambda: following.finish(source)))
            finally:
                following.stop()  # kept from before: what it ran is not needed

        speech = await asyncio.to_thread(work)
        self._measure_voice(speech)
        return speech

    def _measure_voice(self, speech: Speech | None = None) -> None:
        """(Re)measure the gated speech's loudness with the words so far, once the speech is in."""
        self.words_changed = True
        task = self.tasks.get(mixer_pb2.TRACK_SPEECH)
        if speech is None and (task is None or not task.done() or task.cancelled() or task.exception() is not None):
            return
        if self.measuring is None or self.measuring.done():
            self.measuring = asyncio.ensure_future(self._measure(speech or task.result()))  # type: ignore[union-attr]

    async def _measure(self, speech: Speech) -> None:
        n = (await asyncio.shield(self.original)).samples
        while self.words_changed:
            self.words_changed = False
            self.voice = await asyncio.to_thread(_voice_loudness, speech, self.threshold, n, list(self.words))

    async def voice_loudness(self) -> render.VoiceLoudness | None:
        """The speech's loudness as last measured (after ``ready``): None if it could not be."""
        if self.measuring is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.measuring)
        return self.voice

    async def _music(self) -> Music:
        n = (await asyncio.shield(self.original)).samples

        def work() -> Music:
            source = self._source(mixer_pb2.TRACK_BGM, self.config.bgm_format, n)
            units = render.UnitDigests() if self.digest_music else None

            def blocks() -> Iterator[np.ndarray]:
                for lo in range(0, n, render.BLOCK):
                    block = source.read(lo, min(n, lo + render.BLOCK))
                    if units is not None:
                        units.feed(block)
                    yield block

            level = loudness_of_blocks(blocks(), sources.CHANNELS)
            return Music(source, level, None if units is None else units.finish())

        return await asyncio.to_thread(work)

    async def ready(self) -> tuple[Original, Speech, Music]:
        """Every track prepared (call after ``receive``); the first failure is raised."""
        original, speech, music = await asyncio.gather(
            self.tasks[mixer_pb2.TRACK_ORIGINAL], self.tasks[mixer_pb2.TRACK_SPEECH],
            self.tasks[mixer_pb2.TRACK_BGM])
        return original, speech, music

    @property
    def original_path(self) -> Path:
        return self.spools[mixer_pb2.TRACK_ORIGINAL].path
