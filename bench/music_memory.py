"""Peak memory of the music service for one long span, made in pieces (the default) and,
for comparison, in one piece (what it did before): each in a fresh process, which starts
the service, streams the span's music out and throws it away, as the mixer's feed would.

    python -m bench.music_memory [--minutes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time


async def generate(minutes: float) -> dict[str, float]:
    from bgm.client import make_channel
    from bgm.server import start_server
    from bgm.settings import ServerSettings
    from bgm.v1 import common_pb2, music_pb2, music_pb2_grpc
    from services.music.servicer import MusicServicer
    from services.music.settings import MusicSettings

    settings = ServerSettings(max_duration_s=minutes * 60 + 1)
    running = await start_server([MusicServicer(MusicSettings(), settings)], settings)
    try:
        await running.wait_ready(300)
        started_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        span = common_pb2.EmotionSpan(emotion=common_pb2.EMOTION_JOY,
                                      span=common_pb2.TimeSpan(start_s=0, end_s=minutes * 60))
        began, received = time.perf_counter(), 0
        async with make_channel(running.address) as channel:
            async for event in music_pb2_grpc.MusicGeneratorStub(channel).Generate(
                    music_pb2.GenerateRequest(spans=[span]), timeout=3600):
                received += len(event.chunk.pcm)
        return {"wall_s": time.perf_counter() - began, "music_mb": received / 2**20,
                "ready_mb": started_kib / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        await running.stop(0)


def child(minutes: float, piece_s: float | None) -> None:
    if piece_s is not None:
        from services.music import servicer

        servicer.PIECE_S = piece_s
    print(json.dumps(asyncio.run(generate(minutes))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--piece-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.piece_s)
        return
    print(f"one {args.minutes:g}-minute span, composer, 48 kHz stereo float32")
    for label, extra in (("in pieces (default)", []), ("in one piece (before)", ["--piece-s", "1e9"])):
        out = subprocess.run([sys.executable, "-m", "bench.music_memory", "--child", str(args.minutes), *extra],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:24s} peak {r['peak_mb']:7.0f} MB (ready {r['ready_mb']:.0f} MB), "
              f"{r['music_mb']:.0f} MB of music in {r['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
