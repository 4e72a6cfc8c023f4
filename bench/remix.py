"""Remix benchmark: the embedded defaults on generated 30 s and 120 s videos.

Reports wall time, real-time factor (wall / video length), each stage's time (from the
gateway's progress events: first report to its 100 % report), and the overlap ratios:
wall / slowest stage (1.0 would be perfect overlap) and wall / sum of stages.
Targets on a 2-core CPU: real-time factor under 0.5, wall under 1.3 x the slowest stage.

The mix streams: it opens at once and takes the original, then the speech as it is
separated and the music when it is composed, so its span covers most of the job. The
stricter figure counts the mix only from its last input (separation or music, whichever
ends later) to the end: the work that nothing else overlaps.

    python -m bench.remix [--lengths 30 120]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bgm.chunks import iter_file_chunks
from bgm.client import make_channel
from bgm.server import start_server
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.example import make_example
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from services.embedded import EmbeddedServices

STAGES = {v: k.removeprefix("STAGE_").lower() for k, v in common_pb2.Stage.items()}


async def remix(
    stub: gateway_pb2_grpc.GatewayStub, video: Path
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Wall time, each stage's span, and when each stage ended (seconds from the start)."""
    async def requests():
        yield gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename=video.name))
        for piece in iter_file_chunks(video):
            yield gateway_pb2.RemixRequest(video=piece)

    began: dict[str, float] = {}
    ended: dict[str, float] = {}
    started = time.perf_counter()
    async for event in stub.Remix(requests(), timeout=3600):
        if event.WhichOneof("event") == "progress":
            p = event.progress
            name = STAGES[p.stage]
            now = time.perf_counter() - started
            began.setdefault(name, now)
            if p.fraction >= 1.0:
                ended[name] = now
    wall = time.perf_counter() - started
    stages = {name: ended[name] - began[name] for name in ended if name not in ("upload",)}
    return wall, stages, ended


async def main_async(lengths: list[float]) -> None:
    settings = ServerSettings()
    running = await start_server([GatewayServicer(GatewaySettings(), settings, EmbeddedServices())], settings)
    await running.wait_ready(900)
    async with make_channel(running.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with tempfile.TemporaryDirectory() as tmp:
            warm = make_example(Path(tmp) / "warm.mp4", section_s=3)
            await remix(stub, warm)  # first-call costs (lazy imports, caches) out of the figures
            for length in lengths:
                video = make_example(Path(tmp) / f"v{length:g}.mp4", section_s=length / 3)
                wall, stages, ended = await remix(stub, video)
                slowest = max(stages.values())
                print(f"\n== {length:g} s video (embedded defaults)")
                print(f"wall {wall:.2f} s   real-time factor {wall / length:.3f} (target < 0.5)")
                for name, seconds in stages.items():
                    print(f"  {name:15s} {seconds:6.2f} s")
                print(f"wall / slowest stage ({max(stages, key=stages.__getitem__)}): {wall / slowest:.2f} "
                      f"(target < 1.3)")
                print(f"wall / sum of stages: {wall / sum(stages.values()):.2f}")
                inputs_done = max(ended.get("separate", 0.0), ended.get("generate_music", 0.0))
                tail = ended["mix"] - inputs_done
                strict = dict(stages, mix=tail)
                print(f"mix after its last input: {tail:.2f} s; wall / slowest stage counting only that: "
                      f"{wall / max(strict.values()):.2f} ({max(strict, key=strict.__getitem__)})")
    await running.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=float, nargs="+", default=[30.0, 120.0])
    args = parser.parse_args()
    asyncio.run(main_async(args.lengths))


if __name__ == "__main__":
    main()
