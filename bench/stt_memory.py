"""Peak memory and wall time of the STT service on long recordings, decoded in windows (the
default) and, for comparison, in one call (what it did before): each length and way in a
fresh process that starts the service and sends it N minutes of espeak lines with pauses as
the gateway does (16 kHz 16-bit PCM).

    python -m bench.stt_memory [--minutes 10 60] [--windows-s 120 60] [--whole]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

RATE = 16_000
LINES = ("The harbour was quiet this morning, and the boats came home early.",
         "I cannot believe they closed the old theatre without telling anyone.",
         "What a wonderful surprise to see all of you here tonight.",
         "The storm is getting closer and I am afraid the bridge will not hold.",
         "We lost everything in the fire, and I still miss the house.")


def make_speech(minutes: float, folder: Path) -> tuple[Path, str]:
    """N minutes of the lines said in turn with pauses, as 16-bit PCM; and the words said
    (the lines that end inside the N minutes)."""
    from bgm import media
    from gateway.example import speak

    parts, ends = [], []
    for i, line in enumerate(LINES):
        speak(line, folder / f"line{i}.wav")
        parts += [media.decode_audio(folder / f"line{i}.wav", RATE, 1, "espeak-ng's speech")[:, 0],
                  np.zeros(round(1.5 * RATE), dtype=np.float32)]
        ends.append(sum(p.shape[0] for p in parts[:-1]))
    unit = (np.clip(np.concatenate(parts), -1, 1) * 32767).astype("<i2")
    n = round(minutes * 60 * RATE)
    path = folder / "speech.s16"
    said = []
    with open(path, "wb") as f:
        for start in range(0, n, unit.shape[0]):
            f.write(unit[: n - start].tobytes())
            said += [line for line, end in zip(LINES, ends, strict=True) if start + end <= n]
    return path, " ".join(said)


async def transcribe(minutes: float, folder: Path) -> dict[str, float]:
    from bench.measures import word_errors
    from bgm.audio import audio_format
    from bgm.chunks import iter_file_chunks
    from bgm.client import make_channel
    from bgm.server import start_server
    from bgm.settings import ServerSettings
    from bgm.v1 import common_pb2, stt_pb2, stt_pb2_grpc
    from services.stt.servicer import SpeechToTextServicer
    from services.stt.settings import SttSettings

    speech, said = make_speech(minutes, folder)
    settings = ServerSettings(max_duration_s=minutes * 60 + 60, max_input_bytes=1 << 40, tmp_dir=str(folder))
    running = await start_server([SpeechToTextServicer(SttSettings(), settings)], settings)
    try:
        await running.wait_ready(300)
        ready_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        async def requests() -> AsyncIterator[stt_pb2.TranscribeRequest]:
            yield stt_pb2.TranscribeRequest(config=stt_pb2.TranscribeConfig(
                format=audio_format(RATE, 1, common_pb2.ENCODING_PCM_S16LE), language="en", word_timestamps=True))
            for piece in iter_file_chunks(speech):
                yield stt_pb2.TranscribeRequest(audio=piece)

        began, segments, words, heard = time.perf_counter(), 0, 0, []
        async with make_channel(running.address) as channel:
            async for event in stt_pb2_grpc.SpeechToTextStub(channel).Transcribe(requests(), timeout=7200):
                if event.WhichOneof("event") == "segment":
                    segments += 1
                    words += len(event.segment.words)
                    heard.append(event.segment.text)
        errors, total = word_errors(said, " ".join(heard))
        return {"wall_s": time.perf_counter() - began, "segments": segments, "words": words, "wer": errors / total,
                "ready_mb": ready_kib / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        await running.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--whole", action="store_true", help="also decode in one call (before), for comparison")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--window-s", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--windows-s", type=float, nargs="+", default=[],
                        help="also decode in windows of these lengths (seconds), for comparison")
    args = parser.parse_args()
    if args.child is not None:
        if args.window_s is not None:
            from services.stt import backend

            backend.WINDOW_S = args.window_s
        with tempfile.TemporaryDirectory(prefix="bgm-sttmem-") as folder:
            print(json.dumps(asyncio.run(transcribe(args.child, Path(folder)))))
        return
    ways: list[tuple[str, list[str]]] = [("in windows (default)", [])]
    ways += [(f"in {window:g} s windows", ["--window-s", str(window)]) for window in args.windows_s]
    if args.whole:
        ways.append(("in one call (before)", ["--window-s", "1e9"]))
    for minutes in args.minutes:
        for label, extra in ways:
            out = subprocess.run([sys.executable, "-m", "bench.stt_memory", "--child", str(minutes), *extra],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{minutes:g} min {label}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{minutes:5g} min {label:22s} peak {r['peak_mb']:6.0f} MB (ready {r['ready_mb']:.0f} MB); "
                  f"{r['wall_s']:.1f} s (RTF {r['wall_s'] / (minutes * 60):.3f}); "
                  f"{r['segments']} segments, {r['words']} words, WER {100 * r['wer']:.1f} %", flush=True)


if __name__ == "__main__":
    main()
