"""One Remix (or Analyze) call: the options from the command line, the upload, and what
comes back, written as it arrives."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bgm import vocab
from bgm.chunks import iter_file_chunks
from bgm.v1 import gateway_pb2, gateway_pb2_grpc, mixer_pb2, music_pb2, stt_pb2
from gateway.cli import files
from gateway.cli.progress import ProgressBars

STEM_NAMES = {mixer_pb2.STEM_SPEECH: "speech", mixer_pb2.STEM_BGM: "bgm", mixer_pb2.STEM_MIX: "mix",
              mixer_pb2.STEM_MUSIC: vocab.MUSIC.name}


def build_options(args: argparse.Namespace, filename: str) -> gateway_pb2.RemixOptions:
    options = gateway_pb2.RemixOptions(filename=filename)
    if getattr(args, "translate", False):
        options.task = stt_pb2.STT_TASK_TRANSLATE
    if getattr(args, "language", None):
        options.language = args.language
    if getattr(args, "min_span", None) is not None:
        options.smoothing.min_span_s = args.min_span
    music = music_pb2.MusicStyle()
    if getattr(args, "music_backend", None):
        music.backend = args.music_backend
    if getattr(args, "seed", None) is not None:
        music.seed = args.seed
    if getattr(args, "tempo", None) is not None:
        music.tempo_bpm = args.tempo
    if getattr(args, "style", None):
        music.style = args.style
    if getattr(args, "intensity", None) is not None:
        music.intensity = args.intensity
    options.music.CopyFrom(music)
    if getattr(args, "duck_db", None) is not None:
        options.mix.duck_db = args.duck_db
    if getattr(args, "duck_wide_db", None) is not None:
        options.mix.duck_wide_db = args.duck_wide_db
    if getattr(args, "duck_sensitivity", None) is not None:
        options.mix.duck_sensitivity = args.duck_sensitivity
    if getattr(args, "loudness", None) is not None:
        options.mix.loudness_lufs = args.loudness
    if getattr(args, "stems", None):
        options.mix.return_stems.extend([mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_BGM, mixer_pb2.STEM_MIX,
                                          mixer_pb2.STEM_MUSIC])
    if getattr(args, "separation", None):
        options.separation_backend = args.separation
    edited = getattr(args, "edited_timeline", None)
    if edited is not None:
        options.timeline.CopyFrom(edited)
    return options


async def upload(options: gateway_pb2.RemixOptions, path: Path,
                 accepted: asyncio.Event) -> AsyncIterator[gateway_pb2.RemixRequest]:
    yield gateway_pb2.RemixRequest(options=options)
    # Wait for the gateway to accept the options (or refuse them, or the token) before uploading.
    await accepted.wait()
    for piece in iter_file_chunks(path):
        yield gateway_pb2.RemixRequest(video=piece)


@dataclass
class Outcome:
    transcript: gateway_pb2.Transcript | None = None
    timeline: gateway_pb2.EmotionTimeline | None = None
    result: gateway_pb2.RemixResponse | None = None
    music: music_pb2.MusicHeader | None = None
    video_bytes: int = 0


async def run_job(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace, bars: ProgressBars,
                  analyze_only: bool) -> Outcome:
    source = Path(args.input)
    options = build_options(args, source.name)
    outcome = Outcome()
    accepted = asyncio.Event()
    call = (stub.Analyze if analyze_only else stub.Remix)(upload(options, source, accepted), timeout=args.timeout)
    # Every file is written beside its target and renamed into place only once the whole
    # job has succeeded: a failure leaves the user's files as they were.
    with contextlib.ExitStack() as written:
        video_file = None if analyze_only else written.enter_context(files.replacing(Path(args.output)))
        stems: dict[int, IO[bytes]] = {}
        async for event in call:
            accepted.set()
            kind = event.WhichOneof("event")
            if kind == "progress":
                bars.update(event.progress)
            elif kind == "transcript":
                outcome.transcript = event.transcript
            elif kind == "timeline":
                outcome.timeline = event.timeline
            elif kind == "score":
                outcome.music = event.score
            elif kind == "result":
                outcome.result = event
            elif kind == "video" and video_file is not None:
                video_file.write(event.video)
                outcome.video_bytes += len(event.video)
            elif kind == "stem" and args.stems:
                if event.stem.stem not in stems:
                    name = f"{STEM_NAMES.get(event.stem.stem, 'stem')}.wav"
                    stems[event.stem.stem] = written.enter_context(files.replacing(Path(args.stems) / name))
                stems[event.stem.stem].write(event.stem.data)
        if video_file is not None and outcome.video_bytes == 0:
            raise RuntimeError("the gateway finished without sending a video")
    return outcome


def summary(outcome: Outcome) -> str:
    from gateway.outputs import emotion_name

    lines = []
    if outcome.transcript is not None:
        lines.append(f"transcript: {len(outcome.transcript.segments)} segments, "
                     f"language {outcome.transcript.language or '-'}")
    if outcome.timeline is not None:
        spans = ", ".join(f"{emotion_name(s.emotion)} {s.span.start_s:.1f}-{s.span.end_s:.1f}s"
                          for s in outcome.timeline.spans)
        lines.append(f"emotions: {spans}")
    return "\n".join(lines)
