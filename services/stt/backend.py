"""faster-whisper behind one small interface, with model resolution and language routing.

Two models may be in play: the primary one (English-only tiny.en by default on a CPU: fast)
and a multilingual one (bundled Whisper base by default) that detects the language, serves
non-English speech and does Whisper's translate task. The multilingual model loads lazily
unless language detection is on, in which case it loads at start.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np

from bgm import logs, models, vocab
from bgm.audio import Recording
from bgm.errors import Unsupported
from services.stt.cancel import CancellableWhisper, Cancelled, cancelled_by
from services.stt.features import PiecewiseFeatures
from services.stt.settings import SttSettings

log = logs.get("bgm.stt")
SAMPLE_RATE = vocab.STT_RATE
# Shortest clip worth sending to the decoder; shorter input yields no segments.
MIN_SAMPLES = SAMPLE_RATE // 10
SAMPLING_SEED = 0
# Whisper re-decodes a 30 s window at up to five higher temperatures when its text
# compresses too well (a hallucinated loop). Speech that repeats itself compresses just as
# well, so every window of it was decoded six times: 120 s of lines said over and over took
# 58.7 s against 8.2 s for 111 s of distinct lines. The low-confidence fallback
# (avg_logprob under -1) stays on, and the voice-activity filter already keeps the silence
# where loops are hallucinated away from the decoder. Without the ratio check: 10.4 s.
COMPRESSION_RATIO_THRESHOLD: float | None = None
# No spoken word lasts this long; a last word that does hides text Whisper skipped.
STRETCHED_WORD_S = 2.5
# A long recording is decoded this much at a time: faster-whisper computes the features of
# all it is given at once (its spectrogram of an hour is 0.6 GB). Each window ends in the
# quietest CUT_PAUSE_S of its last CUT_SEARCH_S, so no word is cut in two.
WINDOW_S = 300.0
CUT_SEARCH_S = 30.0
CUT_PAUSE_S = 0.3


def cuda_available() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except Exception:
        return False


def _local_hub_model(name: str) -> str | None:
    """The local directory of a hub model already in the cache, or None (never downloads)."""
    try:
        from faster_whisper.utils import download_model

        return str(download_model(name, local_files_only=True))
    except Exception:
        return None


def resolve_model(name: str, fallback: str, full_model: str, device: str) -> str:
    """Turn a setting into something WhisperModel can open without a hub."""
    if name == vocab.AUTO:
        if device == "cuda":
            local = _local_hub_model(full_model)
            if local:
                return local
        name = fallback
    if name in models.WHISPER_BUNDLED:
        return str(models.WHISPER_BUNDLED[name]())
    if Path(name).is_dir():
        if not (Path(name) / "model.bin").is_file():
            raise models.ModelNotFound(f"{name} has no model.bin: not a CTranslate2 Whisper model directory")
        return name
    # A faster-whisper size or hub id: faster-whisper fetches it where a hub is reachable.
    return name


@dataclass(frozen=True)
class Options:
    task: str = "transcribe"
    language: str | None = None
    vad_filter: bool = True
    word_timestamps: bool = True
    beam_size: int = 5


@dataclass
class Word:
    text: str
    start_s: float
    end_s: float
    probability: float


@dataclass
class Segment:
    id: int
    text: str
    start_s: float
    end_s: float
    words: list[Word]
    language: str
    translated: bool
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    # 0 when the first (beam) decoding was kept; higher when Whisper fell back to sampling.
    temperature: float = 0.0


class Loudness:
    """10 ms frame levels of the request's audio, to trim silence off word timings.

    Whisper's word alignment often lets a sentence's last word run on into the pause that
    follows (by up to a second). A word is shrunk to the frames inside it that are audible;
    it is never widened, and a word with no audible frame is left as it is.
    """

    FRAME = SAMPLE_RATE // 100

    def __init__(self, audio: Recording) -> None:
        frames = audio.shape[0] // self.FRAME
        piece = 60 * SAMPLE_RATE  # a minute at a time: the recording may be a file read in windows
        parts = [np.square(audio[start : min(start + piece, frames * self.FRAME)], dtype=np.float32)
                 .reshape(-1, self.FRAME).mean(axis=1) for start in range(0, frames * self.FRAME, piece)]
        power = np.concatenate(parts) if parts else np.zeros(1)
        self.power = power
        levels = 10 * np.log10(power + 1e-12)
        threshold = max(float(np.percentile(levels, 95)) - 35.0, -60.0)
        self.audible = levels > threshold

    def windows(self, samples: int) -> list[tuple[int, int]]:
        """Consecutive sample ranges of at most WINDOW_S covering ``samples``, each cut in the
        middle of the quietest CUT_PAUSE_S of its last CUT_SEARCH_S."""
        size = int(WINDOW_S * SAMPLE_RATE)
        search, pause = round(CUT_SEARCH_S * 100), max(1, round(CUT_PAUSE_S * 100))
        out, lo = [], 0
        while samples - lo > size:
            end = (lo + size) // self.FRAME  # in frames
            first = max(lo // self.FRAME + 1, end - search)
            quiet = np.convolve(self.power[first:end], np.ones(pause), mode="valid")
            cut = (first + int(np.argmin(quiet)) + pause // 2) * self.FRAME if quiet.size else lo + size
            out.append((lo, cut))
            lo = cut
        out.append((lo, samples))
        return out

    def trim(self, start: float, end: float) -> tuple[float, float]:
        first, last = int(start * 100), int(np.ceil(end * 100))
        inside = np.flatnonzero(self.audible[first:last])
        if inside.size == 0:
            return start, end
        new_start = max(start, (first + inside[0]) / 100)
        new_end = min(end, (first + inside[-1] + 1) / 100)
        if new_end - new_start < 0.05:  # keep very short words audible-length, not zero
            return start, end
        return new_start, new_end


@dataclass
class Detected:
    language: str
    probability: float


class WhisperBackend:
    def __init__(self, settings: SttSettings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.device = "cuda" if settings.device == "cuda" or (
            settings.device == vocab.AUTO and cuda_available()) else "cpu"
        self.compute_type = settings.compute_type or ("float16" if self.device == "cuda" else "int8")
        self._lock = threading.Lock()
        self._multilingual: object | None = None
        self.primary_path = resolve_model(settings.model, "tiny.en", settings.full_model, self.device)
        self.primary = self._open(self.primary_path)
        # Worked out once, at load: locating a bundled model touches files.
        self.name = self._model_name()
        if self.is_multilingual(self.primary):
            self._multilingual = self.primary
        elif settings.detect_language:
            self.multilingual()

    def _open(self, path: str) -> object:
        from faster_whisper import WhisperModel

        started = time.monotonic()
        model = WhisperModel(path, device=self.device, compute_type=self.compute_type,
                             cpu_threads=self.settings.cpu_threads, num_workers=self.workers)
        model.model = CancellableWhisper(model.model)  # stops between steps when cancelled
        model.feature_extractor = PiecewiseFeatures(model.feature_extractor)  # same features, a few MB
        log.info("whisper model loaded", extra={"fields": {
            "model": path, "device": self.device, "compute_type": self.compute_type,
            "multilingual": model.model.is_multilingual, "load_s": round(time.monotonic() - started, 2)}})
        return model

    @staticmethod
    def is_multilingual(model: object) -> bool:
        return bool(model.model.is_multilingual)  # type: ignore[attr-defined]

    def multilingual(self) -> object:
        with self._lock:
            if self._multilingual is None:
                try:
                    path = resolve_model(self.settings.multilingual_model, "base",
                                         self.settings.full_model, self.device)
                    self._multilingual = self._open(path)
                except models.ModelNotFound as exc:
                    raise Unsupported(f"no multilingual Whisper model is installed: {exc}") from exc
            return self._multilingual

    def _model_name(self) -> str:
        for bundled, locate in models.WHISPER_BUNDLED.items():
            if self.primary_path == str(locate()):
                return f"whisper-{bundled}"
        return self.primary_path

    def choose(self, audio: Recording, options: Options) -> tuple[object, Options, Detected | None]:
        """Pick the model for a request and, if needed, the language."""
        needs_multilingual = options.task == "translate" or (
            options.language not in (None, "en"))
        if needs_multilingual or self.is_multilingual(self.primary):
            return self.multilingual() if needs_multilingual else self.primary, options, None
        if options.language == "en" or not self.settings.detect_language:
            return self.primary, options, Detected("en", 1.0) if options.language == "en" else None
        language, probability, _ = self.multilingual().detect_language(  # type: ignore[attr-defined]
            audio, vad_filter=options.vad_filter)
        detected = Detected(language, float(probability))
        if language == "en":
            return self.primary, Options(**{**options.__dict__, "language": "en"}), detected
        return self.multilingual(), Options(**{**options.__dict__, "language": language}), detected

    def transcribe(
        self, audio: Recording, options: Options, cancel: threading.Event
    ) -> Iterator[Detected | Segment]:
        """Yield the detected language first, then segments as the decoder produces them;
        stop before the model's next step once ``cancel`` is set."""
        if audio.shape[0] < MIN_SAMPLES:
            return
        with cancelled_by(cancel):
            try:
                yield from self._transcribe(audio, options, cancel)
            except Cancelled:
                log.info("transcription cancelled")

    def _transcribe(
        self, audio: Recording, options: Options, cancel: threading.Event
    ) -> Iterator[Detected | Segment]:
        loudness = Loudness(audio)
        windows = loudness.windows(audio.shape[0])
        first_lo, first_hi = windows[0]
        model, options, detected = self.choose(audio[first_lo:first_hi], options)
        # Whisper falls back to sampling at higher temperatures where greedy or beam output
        # looks wrong; a fixed seed makes that reproducible (same audio, same transcript).
        ctranslate2.set_random_seed(SAMPLING_SEED)
        decode = functools.partial(
            model.transcribe,  # type: ignore[attr-defined]
            task=options.task,
            beam_size=options.beam_size,
            vad_filter=options.vad_filter,
            word_timestamps=options.word_timestamps,
            condition_on_previous_text=False,  # keeps one bad segment from poisoning the rest
            compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
        )
        language = options.language
        numbered = 0  # faster-whisper numbers each window's segments from 1
        for lo, hi in windows:
            if cancel.is_set():
                return
            segments, info = decode(audio[lo:hi], language=language)
            if lo == 0:  # the language is the first window's, and said once
                language = info.language
                yield detected if detected is not None else Detected(language, float(info.language_probability))
            assert language is not None
            translated = options.task == "translate" and language != "en"
            for seg in self._window(segments, decode, audio, lo, hi, language, translated, loudness, cancel):
                numbered += 1
                yield dataclasses.replace(seg, id=numbered)

    def _window(self, segments: Iterable[Any], decode: Callable[..., Any], audio: Recording, lo: int, hi: int,
                language: str, translated: bool, loudness: Loudness, cancel: threading.Event) -> Iterator[Segment]:
        """The segments of one window (``audio[lo:hi]``), in the recording's time."""
        def made(seg: Any, offset: float) -> Segment | None:
            text = seg.text.strip()
            if not text:
                return None
            words = [Word(w.word.strip(), *loudness.trim(float(w.start) + offset, float(w.end) + offset),
                          float(w.probability)) for w in (seg.words or [])]
            start, end = ((words[0].start_s, words[-1].end_s) if words
                          else (float(seg.start) + offset, float(seg.end) + offset))
            return Segment(
                id=seg.id, text=text, start_s=start, end_s=end, words=words,
                language=language, translated=translated,
                avg_logprob=float(seg.avg_logprob), no_speech_prob=float(seg.no_speech_prob),
                compression_ratio=float(seg.compression_ratio),
                temperature=float(seg.temperature or 0.0),
            )

        # The last segment is held back: Whisper sometimes stops a window's text early and
        # stretches the last word over the rest of the speech ("... for no reason. I am"
        # with "am" lasting 5 s). That segment is then transcribed again on its own, from its
        # start (a window that begins there, with the words before it out of the way).
        held: Segment | None = None
        for seg in segments:
            if cancel.is_set():
                return
            current = made(seg, lo / SAMPLE_RATE)
            if current is None:
                continue
            if held is not None:
                yield held
            held = current
        if held is None:
            return
        tail = self._stretched_tail(held, hi / SAMPLE_RATE)
        if tail is None or cancel.is_set():
            yield held
            return
        again, _ = decode(audio[int(tail * SAMPLE_RATE) : hi], language=language)
        recovered = [r for r in (made(seg, tail) for seg in again) if r is not None]
        if not recovered:
            yield held
            return
        log.info("transcribed a stretched ending again", extra={"fields": {"from_s": round(tail, 2)}})
        yield from recovered

    @staticmethod
    def _stretched_tail(segment: Segment, duration_s: float) -> float | None:
        """Where to transcribe again when the last word lasts implausibly long (None: it does not)."""
        if not segment.words:
            return None
        last = segment.words[-1]
        if last.end_s - last.start_s < STRETCHED_WORD_S or duration_s - last.start_s < 1.0:
            return None
        return segment.start_s
