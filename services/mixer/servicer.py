"""The Mixer gRPC servicer: Separate (speech out of a recording) and MixAndMux."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile
from grpc import aio

from bgm import audio, cache, logs, scratch, settings, vocab
from bgm.chunks import CHUNK_BYTES, Spool, StreamLimits, iter_chunks, iter_file_chunks, read_config
from bgm.errors import ConcurrencyLimiter, InvalidInput
from bgm.limits import MIX_RANGES, check_range
from bgm.server import ModelServicer, Servicer
from bgm.settings import ServerSettings
from bgm.threads import iterate_in_thread
from bgm.v1 import common_pb2, mixer_pb2, mixer_pb2_grpc
from services.mixer import aac, activity, dsp, encode, mux, render, reprise, residue, separation
from services.mixer.settings import MixerSettings
from services.mixer.tracks import DURATION_SETTING, Music, Original, Speech, TrackSet

RATE = dsp.SAMPLE_RATE
log = logs.get("bgm.mixer")
CACHED_BLOCK = 10 * RATE  # cached speech goes out in blocks as separated speech would
STEM_SOURCES = (mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_BGM, mixer_pb2.STEM_MIX)


def _progress(stage: int, fraction: float, started: float, message: str) -> common_pb2.Progress:
    return common_pb2.Progress(stage=stage, fraction=fraction,  # type: ignore[arg-type]
                               elapsed_s=time.monotonic() - started, message=message)


class MixerServicer(ModelServicer, mixer_pb2_grpc.MixerServicer):
    service_name = mixer_pb2.DESCRIPTOR.services_by_name["Mixer"].full_name

    def __init__(self, mixer: MixerSettings, server: ServerSettings) -> None:
        super().__init__()
        self.settings = mixer
        # Disk only: a programme's speech is too large to keep many of in memory.
        self.cache = cache.ArrayCache(mixer.cache_dir, 0, mixer.cache_mb * 2**20)
        self.server = server
        # Separate and MixAndMux get their own slots: a remix holds a MixAndMux open while its
        # speech is still being separated, so sharing slots could starve its own Separate.
        self.limiter = ConcurrencyLimiter(server.max_concurrency, "the mixer's Separate")
        self.mix_limiter = ConcurrencyLimiter(server.max_concurrency, "the mixer's MixAndMux")
        self.uploads = ConcurrencyLimiter(server.max_uploads, "the mixer's uploads")
        self.stream = StreamLimits.of(server, vocab.MIXER)
        self.separators: dict[str, separation.Separator] = {}
        self.loading = asyncio.Lock()

    def add_to_server(self, server: aio.Server) -> None:
        mixer_pb2_grpc.add_MixerServicer_to_server(self, server)

    async def load(self) -> None:
        await self.separator(self.settings.separation_backend)
        await asyncio.to_thread(activity.load)
        self.ready = True

    async def separator(self, name: str) -> separation.Separator:
        """The named separator, loaded on first use (off the loop, once however many ask)."""
        name = name or self.settings.separation_backend
        if name not in vocab.SEPARATION_BACKENDS:
            raise InvalidInput(f"unknown separation backend {name!r}; use {vocab.choices(vocab.SEPARATION_BACKENDS)}")
        async with self.loading:
            if name not in self.separators:
                self.separators[name] = await asyncio.to_thread(
                    separation.create, name, self.settings.demucs_model, self.settings.device,
                    self.settings.attenuation_limit_db)
        return self.separators[name]

    # ----- Separate -------------------------------------------------------------------
    async def Separate(
        self, request_iterator: AsyncIterator[mixer_pb2.SeparateRequest], context: aio.ServicerContext
    ) -> AsyncIterator[mixer_pb2.SeparateResponse]:
        self.require_ready()
        self.limiter.check()
        started = time.monotonic()
        # The recording stays on disk and is read a window at a time (``audio.WindowedMono``).
        with scratch.workdir("separate", self.server.tmp_dir) as tmp, \
                Spool(self.server.max_input_bytes, "audio", tmp) as spool:
            with self.uploads:
                config, rest = await read_config(request_iterator, "config", "audio", self.stream)
                audio.check_format(config.format, "config.format")
                stems = list(config.stems) or [mixer_pb2.STEM_SPEECH]
                if any(s not in (mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_REST) for s in stems):
                    raise InvalidInput("Separate returns SPEECH and REST stems only")
                separator = await self.separator(config.backend)
                mono = await audio.receive_recording(rest, spool, config.format, RATE, self.server.max_duration_s,
                                                     DURATION_SETTING, Path(tmp))
            async with mono:  # closed off the loop: a file may wait for a reader thread
                with self.limiter:
                    # Stems come back in the encoding the audio came in (16-bit halves what the
                    # caller keeps on disk), at the mixer's rate, mono.
                    encoding = config.format.encoding if config.format.encoding == audio.PCM_S16LE else audio.PCM_F32LE
                    fmt = audio.audio_format(RATE, 1, encoding)
                    yield mixer_pb2.SeparateResponse(header=mixer_pb2.StemsHeader(
                        format=fmt, stems=stems, total_samples=mono.shape[0], backend=separator.name))
                    # Stems go out as the separator produces them, so the caller can start on the
                    # first seconds (the gateway feeds them straight into MixAndMux).
                    done = 0

                    def produce(cancel: threading.Event) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
                        return stem_pcm(self.speech_blocks(separator, mono, cancel), mono, stems, encoding)

                    async for size, encoded in iterate_in_thread(produce):
                        for stem, pcm in encoded:
                            for piece in iter_chunks(pcm, CHUNK_BYTES):
                                yield mixer_pb2.SeparateResponse(chunk=mixer_pb2.StemChunk(stem=stem, data=piece))  # type: ignore[arg-type]
                        done += size
                        yield mixer_pb2.SeparateResponse(progress=_progress(
                            common_pb2.STAGE_SEPARATE, done / max(1, mono.shape[0]), started,
                            f"separating with {separator.name}"))

    def speech_blocks(self, separator: separation.Separator, mono: audio.Recording,
                      cancel: threading.Event) -> Iterator[np.ndarray]:
        """The separated speech block by block: from the cache when this audio was separated
        the same way before, else from the separator (and kept, once complete)."""
        expansion = self.settings.expansion
        # The expander reads the recording behind the separator: a reader of its own keeps each
        # one's window (one reader would load a window anew at every turn). Lazy: starts when read.
        separated = residue.expand(audio.own_reader(mono), separator.speech_blocks(mono, cancel), expansion)
        if self.cache.folder is None:
            yield from separated
            return
        name = cache.key("speech", separator.name, self.settings.demucs_model, self.settings.attenuation_limit_db,
                         expansion, RATE, mono.digest() if isinstance(mono, audio.WindowedMono) else mono)
        kept = self.cache.kept_file(name)
        if kept is not None:
            with open(kept, "rb") as f:
                while data := f.read(CACHED_BLOCK * 4):
                    yield np.frombuffer(data, dtype="<f4").copy()
            return
        # Kept as it is made, on disk (an hour is 0.7 GB), and only once complete.
        with self.cache.writing(name) as pending:
            done, keeping = 0, pending is not None
            for block in separated:
                if keeping:
                    try:
                        pending.file.write(np.ascontiguousarray(block, dtype="<f4").tobytes())  # type: ignore[union-attr]
                    except OSError as exc:  # a full cache costs speed, never the request
                        self.cache.cannot_write(exc)
                        keeping = False
                done += block.shape[0]
                yield block
            if pending is not None:
                pending.keep = keeping and not cancel.is_set() and done == mono.shape[0]

    def speech_probability(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The VAD's verdict on the speech track (``name`` keys the speech as sent), from the
        cache when this speech was seen before (a re-render mixes the same speech under new
        music)."""
        if self.cache.folder is None:
            return compute()
        found = self.cache.get(name)
        if found is None:
            found = compute()
            self.cache.put(name, found)
        return found

    # ----- MixAndMux ------------------------------------------------------------------
    def levels(self, options: mixer_pb2.MixOptions) -> dsp.MixLevels:
        s = self.settings

        values = {}
        for name, (low, high) in MIX_RANGES.items():
            value = getattr(options, name) if options.HasField(name) else getattr(s, name)  # type: ignore[arg-type]
            values[name] = float(check_range(f"mix option {name}", value, low, high))
        return dsp.MixLevels(**values)

    async def MixAndMux(
        self, request_iterator: AsyncIterator[mixer_pb2.MixRequest], context: aio.ServicerContext
    ) -> AsyncIterator[mixer_pb2.MixResponse]:
        self.require_ready()
        self.mix_limiter.check()
        with scratch.workdir("mix", self.server.tmp_dir) as tmp:
            started = time.monotonic()
            with self.uploads:
                config, rest = await read_config(request_iterator, "config", "chunk", self.stream)
                levels = self.levels(config.options)
                if any(s not in STEM_SOURCES for s in config.options.return_stems):
                    raise InvalidInput("return_stems takes SPEECH, BGM and MIX")
                for name, fmt in (("speech_format", config.speech_format), ("bgm_format", config.bgm_format)):
                    if fmt.encoding != common_pb2.ENCODING_UNSPECIFIED:
                        audio.check_format(fmt, name)
                tracks = TrackSet(config, self.server.max_input_bytes, tmp, self.server.max_duration_s,
                                  activity.threshold_for(levels.duck_sensitivity), self.speech_probability,
                                  digest_music=self.cache.folder is not None)
                try:
                    await tracks.receive(rest)
                    original, speech, music = await tracks.ready()
                    voice = await tracks.voice_loudness()
                except BaseException:
                    tracks.close()
                    raise
            received = time.monotonic()
            # The tracks stay on disk until the stems are written: the mix is read from them.
            try:
                with self.mix_limiter:
                    outcome, out_path, out = await asyncio.to_thread(
                        self._mix, config, levels, tracks, original, speech, music, voice, Path(tmp))
                log.info("mixed", extra={"fields": {"tracks_in_s": round(received - started, 3),
                                                    "mix_and_encode_s": round(time.monotonic() - received, 3),
                                                    "encodes": outcome.encodes}})
                yield mixer_pb2.MixResponse(progress=_progress(common_pb2.STAGE_MIX, 1.0, started,
                                                               "mixed and muxed"))
                yield mixer_pb2.MixResponse(result=mixer_pb2.MixResult(
                    container=out.format, mime_type=out.mime_type, duration_s=original.info.duration_s,
                    loudness_lufs=outcome.loudness_lufs, true_peak_dbtp=outcome.true_peak_dbtp,
                    video_copied=original.info.has_video))
                for piece in iter_file_chunks(out_path):
                    yield mixer_pb2.MixResponse(media=piece)
                written = await asyncio.to_thread(write_stems, config.options.return_stems, outcome, Path(tmp))
            finally:
                tracks.close()
            for message in stem_messages(written):
                yield message

    def _mix(self, config: mixer_pb2.MixConfig, levels: dsp.MixLevels, tracks: TrackSet, original: Original,
             speech: Speech, music: Music, voice: render.VoiceLoudness | None,
             tmp: Path) -> tuple[render.MixOutcome, Path, mux.Output]:
        clock = time.monotonic()
        words, speech_digest = tracks.words, tracks.speech_digest.hexdigest()
        n = original.samples
        out = mux.output_for(config.original_name, original.info)
        talking = activity.talking(speech.probability, activity.threshold_for(levels.duck_sensitivity), n, words)
        # An earlier mix of this programme (a re-render): what did not change is reused.
        kept_as = None
        if self.cache.folder is not None and out.audio_codec == "aac" and music.digests is not None:
            kept_as = reprise.key(speech_digest, config.speech_format, list(words), talking, levels, n,
                                  self.settings.audio_bitrate)
        previous = None if kept_as is None else reprise.load(self.cache, kept_as, n, tmp)
        try:
            levelled = render.mix_levelled(speech.source, music.source, levels, talking, music.level_lufs,
                                           folder=str(tmp), known=voice,
                                           kept=None if previous is None else previous.levels,
                                           digests=kept_as is not None,
                                           reuse=None if previous is None else previous.reuse(music.digests))
            mix_s = time.monotonic() - clock
            target = tmp / f"remixed{out.suffix}"
            spent = encode.Spent()

            def keep(made: render.MixOutcome, stream: aac.Stream, checked: encode.Checked) -> None:
                if kept_as is not None and music.digests is not None:
                    reprise.save(self.cache, kept_as, levelled, music.digests, made, stream, checked.loudness_lufs,
                                 checked.frame_peaks)

            def encoded() -> None:
                # The mux needs only the original and the stream: an hour's speech, music and
                # levelling are some 600 MiB of disk (the stems, where asked, still need the tracks).
                levelled.release()
                if not config.options.return_stems:
                    tracks.close_audio()

            outcome, checked = encode.encoded_within_ceiling(levelled, n, levels.true_peak_dbtp,
                                                             self.settings.audio_bitrate, tracks.original_path,
                                                             original.info, out, target, tmp, spent, previous, keep,
                                                             encoded)
        finally:
            if previous is not None:  # its step files are unnamed temp files: gone once closed
                previous.close()
        outcome = dataclasses.replace(outcome, loudness_lufs=checked.loudness_lufs,
                                      true_peak_dbtp=checked.true_peak_dbtp, encodes=spent.encodes)
        early = voice is not None and voice.fits(talking)
        log.info("mix stages", extra={"fields": {"mix_s": round(mix_s, 3), "speech_loudness_early": early,
                                                 "earlier_mix": previous is not None,
                                                 "levels_kept": levelled.kept is not None,
                                                 "units_measured_again": _dirty_share(levelled), **spent.log()}})
        return outcome, target, out


def _dirty_share(levelled: render.Levelled) -> float:
    reuse = None if levelled.leveller is None else levelled.leveller.reuse
    return 1.0 if reuse is None else round(float(reuse.dirty.mean()), 3)


def stem_pcm(blocks: Iterator[np.ndarray], mono: audio.Recording, stems: Sequence[int],
             encoding: int = audio.PCM_F32LE) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """Each block of separated speech as PCM per stem asked for, with its length in samples
    (in the worker thread: a demucs block is the whole file)."""
    done = 0
    for block in blocks:
        encoded = []
        for stem in stems:
            data = block if stem == mixer_pb2.STEM_SPEECH else mono[done : done + block.shape[0]] - block
            encoded.append((stem, audio.float_to_pcm(data, encoding)))
        done += block.shape[0]
        yield block.shape[0], encoded


def write_stems(wanted: Sequence[int], outcome: render.MixOutcome, tmp: Path) -> list[tuple[int, Path]]:
    """The stems asked for, written as WAV files a block at a time (in a worker thread)."""
    parts: dict[int, str] = {mixer_pb2.STEM_BGM: "bgm", mixer_pb2.STEM_MIX: "mix", mixer_pb2.STEM_SPEECH: "speech"}
    written = []
    for stem in dict.fromkeys(wanted):
        path = tmp / f"stem-{stem}.wav"
        with soundfile.SoundFile(str(path), "w", RATE, 2, subtype="PCM_16") as f:
            for block in outcome.blocks(parts[stem]):
                f.write(block)
        written.append((stem, path))
    return written


def stem_messages(written: Sequence[tuple[int, Path]]) -> Iterator[mixer_pb2.MixResponse]:
    for stem, path in written:
        for piece in iter_file_chunks(path):
            yield mixer_pb2.MixResponse(stem=mixer_pb2.StemChunk(stem=stem, data=piece))  # type: ignore[arg-type]


def build() -> Sequence[Servicer]:
    return [MixerServicer(settings.load(MixerSettings, vocab.MIXER.env_prefix),
                         settings.server_settings(vocab.MIXER.name))]
