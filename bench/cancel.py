"""Does model work stop when its call is cancelled? The CPU time this process spends after
a Separate (DeepFilterNet, 120 s of audio) and a Transcribe (Whisper tiny.en, 300 s of
speech) call is cancelled once its third answer has come (the language and two segments,
or the stems header and two blocks). Both servers run in this process, so its CPU time is theirs.

    python -m bench.cancel
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import numpy as np

from bgm import media
from bgm.audio import audio_format, float_to_pcm
from bgm.chunks import iter_chunks
from bgm.server import RunningServer, start_server
from bgm.settings import ServerSettings
from bgm.v1 import mixer_pb2, mixer_pb2_grpc, stt_pb2, stt_pb2_grpc
from services.mixer.servicer import MixerServicer
from services.mixer.settings import MixerSettings
from services.stt.servicer import SpeechToTextServicer
from services.stt.settings import SttSettings


def cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def speech(seconds: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = f"{tmp}/talk.wav"
        subprocess.run(["espeak-ng", "-w", wav, "Good evening. Tonight we look at the history of the harbour, "
                        "the ships that came, and the people who built the town. It is a long story."], check=True)
        line = media.decode_audio(wav, 16_000, 1)[:, 0]
    return np.tile(line, int(seconds * 16_000 / line.shape[0]) + 1)


def separate_requests() -> Iterator[mixer_pb2.SeparateRequest]:
    noise = (0.1 * np.random.default_rng(0).standard_normal(120 * 48_000)).astype(np.float32)
    yield mixer_pb2.SeparateRequest(config=mixer_pb2.SeparateConfig(format=audio_format(48_000, 1)))
    for piece in iter_chunks(float_to_pcm(noise[:, None])):
        yield mixer_pb2.SeparateRequest(audio=piece)


def transcribe_requests() -> Iterator[stt_pb2.TranscribeRequest]:
    yield stt_pb2.TranscribeRequest(config=stt_pb2.TranscribeConfig(format=audio_format(16_000, 1)))
    for piece in iter_chunks(float_to_pcm(speech(300)[:, None])):
        yield stt_pb2.TranscribeRequest(audio=piece)


def cancelled_after(call: Any, events: int) -> tuple[float, float]:
    """Cancel ``call`` once ``events`` answers have come (the work is under way); CPU spent
    in the next 1 s and in the 2 s after that."""
    for count, _ in enumerate(call, start=1):
        if count >= events:
            break
    call.cancel()
    start = cpu_s()
    time.sleep(1.0)
    first = cpu_s()
    time.sleep(2.0)
    return first - start, cpu_s() - first


def main() -> None:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Coroutine[Any, Any, RunningServer]) -> RunningServer:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def serve(servicer: Any) -> RunningServer:
        running = await start_server([servicer], ServerSettings())
        await running.wait_ready(300)
        return running

    mixer = run(serve(MixerServicer(MixerSettings(), ServerSettings())))
    stt = run(serve(SpeechToTextServicer(SttSettings(detect_language=False), ServerSettings())))
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("Separate, 120 s", lambda: mixer_pb2_grpc.MixerStub(grpc.insecure_channel(mixer.address)).Separate(
            separate_requests(), timeout=300)),
        ("Transcribe, 300 s", lambda: stt_pb2_grpc.SpeechToTextStub(grpc.insecure_channel(stt.address)).Transcribe(
            transcribe_requests(), timeout=300)),
    ]
    print("| call | CPU in the 1 s after the cancel | CPU in the 2 s after that |")
    print("|---|---|---|")
    for name, make in calls:
        first, later = cancelled_after(make(), 3)
        print(f"| {name} | {first:.2f} s | {later:.2f} s |")


if __name__ == "__main__":
    main()
