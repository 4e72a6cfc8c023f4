"""Real-time factor of the STT service over gRPC against faster-whisper called directly.

Same machine, same run, same audio (espeak-ng speech, 16 kHz mono PCM), same model and
decoding options; the service is told the language so that it does the same work and the
difference is gRPC, chunking, decoding of the PCM and the word-timing trim. The auto-detect
path (which also runs the multilingual model's language detection) is reported beside it.

    python -m bench.stt_rtf [--minutes 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from bgm import models
from bgm.audio import resample
from bgm.chunks import iter_chunks
from bgm.client import make_channel
from bgm.server import start_server
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, stt_pb2, stt_pb2_grpc
from services.stt.servicer import SpeechToTextServicer
from services.stt.settings import SttSettings

TEXT = ("The committee met on Tuesday to review the budget. Several members asked for more time. "
        "After a long discussion, they agreed to meet again next week. ")


def make_audio(minutes: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), TEXT], check=True)
        speech, rate = soundfile.read(wav, dtype="float32")
    speech = resample(speech[:, None], rate, 16_000)[:, 0]
    gap = np.zeros(8000, dtype=np.float32)
    unit = np.concatenate([speech, gap])
    reps = int(np.ceil(minutes * 60 * 16_000 / unit.shape[0]))
    return np.tile(unit, reps)[: int(minutes * 60 * 16_000)]


def direct(audio: np.ndarray) -> float:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(models.whisper_tiny_en()), device="cpu", compute_type="int8")
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, language="en", beam_size=5, vad_filter=True, word_timestamps=True,
                                   condition_on_previous_text=False)
    list(segments)
    return time.perf_counter() - started


async def via_service(audio: np.ndarray, repeats: int, language: str) -> list[float]:
    servicer = SpeechToTextServicer(SttSettings(), ServerSettings())
    running = await start_server([servicer], ServerSettings())
    await running.wait_ready()
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    times = []
    async with make_channel(running.address) as channel:
        stub = stt_pb2_grpc.SpeechToTextStub(channel)
        for _ in range(repeats):
            async def requests():
                yield stt_pb2.TranscribeRequest(config=stt_pb2.TranscribeConfig(
                    format=common_pb2.AudioFormat(sample_rate_hz=16_000, channels=1,
                                                  encoding=common_pb2.ENCODING_PCM_S16LE),
                    language=language))
                for piece in iter_chunks(pcm):
                    yield stt_pb2.TranscribeRequest(audio=piece)

            started = time.perf_counter()
            async for _ in stub.Transcribe(requests(), timeout=3600):
                pass
            times.append(time.perf_counter() - started)
    await running.stop(1)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    audio = make_audio(args.minutes)
    seconds = audio.shape[0] / 16_000
    direct_times = [direct(audio) for _ in range(args.repeats)]
    service_times = asyncio.run(via_service(audio, args.repeats, "en"))
    auto_times = asyncio.run(via_service(audio, args.repeats, ""))
    d, s, a = (statistics.median(t) for t in (direct_times, service_times, auto_times))
    print(f"audio: {seconds:.0f} s of speech, tiny.en int8, beam 5, VAD, word timestamps; median of {args.repeats}")
    print(f"faster-whisper direct      : {d:7.2f} s  RTF {d / seconds:.4f}")
    print(f"service over gRPC (en)     : {s:7.2f} s  RTF {s / seconds:.4f}")
    print(f"service, language detected : {a:7.2f} s  RTF {a / seconds:.4f}")
    print(f"gRPC + chunking overhead   : {(s / d - 1) * 100:+.1f} % (target under 5 %)")


if __name__ == "__main__":
    main()
