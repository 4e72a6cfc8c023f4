"""Re-render benchmark: a remix, then the same video again with one span's emotion changed
in the timeline the first run returned (``RemixOptions.timeline``, what ``bgm remix
--timeline-in`` sends), against services that keep a cache (``BGM_GATEWAY_CACHE_DIR``, ``BGM_MUSIC_CACHE_DIR``,
``BGM_MIXER_CACHE_DIR``: what ``--project DIR`` points them at).

Reports both runs' wall times and their ratio (target: the second at most 25 % of the
first), and checks the music the gateway hands back (the MUSIC stem): every span but the
changed one must be sample-identical to the first run's.

Each length gets a fresh server with empty caches; a short warm-up remix on another video
keeps model loading and first-call costs out of both figures.

    python -m bench.rerender [--lengths 30 600] [--log]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bgm import settings as settings_module
from bgm import vocab
from bgm.chunks import iter_file_chunks
from bgm.client import make_channel
from bgm.server import start_server
from bgm.settings import ServerSettings
from bgm.v1 import gateway_pb2, gateway_pb2_grpc, mixer_pb2
from gateway.example import SCRIPT, make_example

OTHER = {vocab.JOY: vocab.FEAR, vocab.SADNESS: vocab.SURPRISE, vocab.ANGER: vocab.NEUTRAL}


async def remix(stub: gateway_pb2_grpc.GatewayStub, video: Path, timeline: gateway_pb2.EditedTimeline | None = None
                ) -> tuple[float, gateway_pb2.EditedTimeline, np.ndarray]:
    """Wall time, the timeline as the next run would send it (seeds recorded), the music."""
    import soundfile

    options = gateway_pb2.RemixOptions(filename=video.name)
    options.mix.return_stems.append(mixer_pb2.STEM_MUSIC)
    if timeline is not None:
        options.timeline.CopyFrom(timeline)

    async def requests():
        yield gateway_pb2.RemixRequest(options=options)
        for piece in iter_file_chunks(video):
            yield gateway_pb2.RemixRequest(video=piece)

    returned = gateway_pb2.EditedTimeline()
    music = io.BytesIO()
    seeds: list[int] = []
    started = time.perf_counter()
    async for event in stub.Remix(requests(), timeout=3600):
        kind = event.WhichOneof("event")
        if kind == "transcript":
            returned.transcript.CopyFrom(event.transcript)
        elif kind == "timeline":
            returned.spans.extend(event.timeline.spans)
        elif kind == "score":
            seeds = list(event.score.span_seeds)
        elif kind == "stem" and event.stem.stem == mixer_pb2.STEM_MUSIC:
            music.write(event.stem.data)
    wall = time.perf_counter() - started
    for span, seed in zip(returned.spans, seeds, strict=True):
        span.control.seed = seed
    music.seek(0)
    samples, _ = soundfile.read(music, dtype="float32")
    return wall, returned, samples


async def measure(length: float, work: Path) -> None:
    from gateway.cli.project import cache_settings
    from gateway.servicer import GatewayServicer
    from gateway.settings import GatewaySettings
    from services.embedded import EmbeddedServices

    os.environ.update(cache_settings(work))
    settings = ServerSettings()
    gateway = settings_module.load(GatewaySettings, vocab.GATEWAY.env_prefix)
    running = await start_server([GatewayServicer(gateway, settings, EmbeddedServices())], settings)
    try:
        await running.wait_ready(900)
        async with make_channel(running.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await remix(stub, make_example(work / "warm.mp4", section_s=3))
            sections = max(1, round(length / 10))
            video = make_example(work / "video.mp4", section_s=length / sections,
                                 script=tuple(SCRIPT[i % len(SCRIPT)] for i in range(sections)))
            first, timeline, music_1 = await remix(stub, video)
            changed = len(timeline.spans) // 2
            span = timeline.spans[changed]
            old = vocab.emotion_name(span.emotion) or vocab.NEUTRAL
            span.emotion = vocab.emotion_enum(OTHER.get(old, vocab.JOY))  # type: ignore[assignment]
            second, _, music_2 = await remix(stub, video, timeline)
    finally:
        await running.stop(1)
    rate = vocab.SEPARATION_RATE
    same = []
    for i, s in enumerate(timeline.spans):
        a, b = round(s.span.start_s * rate), round(s.span.end_s * rate)
        if i != changed:
            same.append(bool(np.array_equal(music_1[a:b], music_2[a:b])))
    a, b = round(span.span.start_s * rate), round(span.span.end_s * rate)
    print(f"\n== {length:g} s video, {len(timeline.spans)} spans; span {changed} changed "
          f"{old} -> {vocab.emotion_name(span.emotion)}")
    print(f"first run   {first:7.2f} s")
    print(f"second run  {second:7.2f} s   = {second / first:.1%} of the first (target <= 25 %)")
    print(f"other spans' music sample-identical: {sum(same)}/{len(same)}; "
          f"changed span differs: {not np.array_equal(music_1[a:b], music_2[a:b])}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=float, nargs="+", default=[30.0, 600.0])
    parser.add_argument("--log", action="store_true", help="the services' JSON logs on stderr (where time goes)")
    args = parser.parse_args()
    if args.log:
        from bgm import logs

        logs.configure("bench", "INFO")
    for length in args.lengths:
        with tempfile.TemporaryDirectory(prefix="bgm-rerender-") as tmp:
            asyncio.run(measure(length, Path(tmp)))


if __name__ == "__main__":
    main()
