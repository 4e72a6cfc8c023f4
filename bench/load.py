"""Concurrent remixes on the embedded defaults, over loopback.

N clients each send their own video at once. A client refused with RESOURCE_EXHAUSTED
waits for the retry hint in the message and tries again (at most ``--attempts`` times).
Reports successes, refusals, p50/p95 latency, and the process's peak resident memory
(the four services and the gateway all run in this process). Every output is checked
against its own input (same video packets, same duration), so nothing is mixed up.

    python -m bench.load [--clients 4 16] [--section 1.0]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bgm.chunks import iter_file_chunks
from bgm.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.example import SCRIPT, make_example

HINT = re.compile(r"retry after ([0-9.]+) s")


@dataclass
class Outcome:
    ok: bool = False
    refusals: int = 0
    latency_s: float = 0.0
    error: str = ""
    video: bytes = field(default=b"", repr=False)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_client(address: str, video: Path, attempts: int, out: Outcome) -> None:
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address))
    started = time.perf_counter()
    for _ in range(attempts):
        def requests():
            yield gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename=video.name))
            for piece in iter_file_chunks(video):
                yield gateway_pb2.RemixRequest(video=piece)

        try:
            out.video = b"".join(e.video for e in stub.Remix(requests(), timeout=1800)
                                 if e.WhichOneof("event") == "video")
            out.ok = True
            break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                out.error = f"{exc.code().name}: {exc.details()}"
                break
            out.refusals += 1
            hint = HINT.search(exc.details() or "")
            assert hint, f"RESOURCE_EXHAUSTED without a retry hint: {exc.details()}"
            time.sleep(min(float(hint.group(1)), 5.0) / 2)
    out.latency_s = time.perf_counter() - started


def make_videos(directory: Path, count: int, section_s: float) -> list[Path]:
    """Distinct videos: each client's has its own length and its own order of moods."""
    videos = []
    for i in range(count):
        script = tuple(SCRIPT[(i + k) % len(SCRIPT)] for k in range(len(SCRIPT)))
        videos.append(make_example(directory / f"client{i}.mp4", section_s=section_s + 0.1 * i, script=script))
    return videos


def run_load(address: str, videos: list[Path], attempts: int) -> list[Outcome]:
    outcomes = [Outcome() for _ in videos]
    threads = [threading.Thread(target=one_client, args=(address, video, attempts, outcome))
               for video, outcome in zip(videos, outcomes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def check_outputs(videos: list[Path], outcomes: list[Outcome], scratch: Path) -> int:
    """Each remix against its own input: same video packets, same duration."""
    from tests.media_files import duration, video_packet_hashes

    matched = 0
    for i, (video, outcome) in enumerate(zip(videos, outcomes, strict=True)):
        if not outcome.ok:
            continue
        out = scratch / f"out{i}.mp4"
        out.write_bytes(outcome.video)
        if video_packet_hashes(out) == video_packet_hashes(video) and abs(duration(out) - duration(video)) <= 0.05:
            matched += 1
    return matched


def report(n: int, outcomes: list[Outcome], matched: int) -> str:
    latencies = sorted(o.latency_s for o in outcomes if o.ok)
    p50 = statistics.median(latencies) if latencies else float("nan")
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))] if latencies else float("nan")
    errors = [o.error for o in outcomes if o.error]
    return (f"N={n}: {sum(o.ok for o in outcomes)}/{n} succeeded, {matched} matched their own input, "
            f"{sum(o.refusals for o in outcomes)} RESOURCE_EXHAUSTED refusals (retried), "
            f"p50 {p50:.1f} s, p95 {p95:.1f} s, peak memory {peak_rss_mib():.0f} MiB"
            + (f", errors: {errors}" if errors else ""))


def main() -> None:
    import asyncio

    from bgm.server import start_server
    from bgm.settings import ServerSettings
    from gateway.servicer import GatewayServicer
    from gateway.settings import GatewaySettings
    from services.embedded import EmbeddedServices

    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--section", type=float, default=1.0, help="seconds per mood section of each video")
    parser.add_argument("--attempts", type=int, default=200)
    args = parser.parse_args()

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    settings = ServerSettings()
    running = asyncio.run_coroutine_threadsafe(
        start_server([GatewayServicer(GatewaySettings(), settings, EmbeddedServices())], settings), loop).result()
    asyncio.run_coroutine_threadsafe(running.wait_ready(900), loop).result()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            videos = make_videos(Path(tmp), n, args.section)
            outcomes = run_load(running.address, videos, args.attempts)
            print(report(n, outcomes, check_outputs(videos, outcomes, Path(tmp))), flush=True)
    asyncio.run_coroutine_threadsafe(running.stop(1), loop).result()


if __name__ == "__main__":
    main()
