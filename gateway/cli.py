"""``bgm``: remix a video, analyse one, make the example, or run the services.

Exit codes: 0 done; 2 bad usage or a missing/unreadable input file; 3 the input was refused
(INVALID_ARGUMENT); 4 a service or the gateway is unavailable; 5 a deadline passed;
6 not authorised (token or certificate); 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc import aio

from bgm import vocab
from bgm.chunks import iter_file_chunks
from bgm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, mixer_pb2, music_pb2, stt_pb2
from gateway import paths

ALL_SERVICES = "all"  # `bgm serve all`: the gateway with the four services in-process

EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 3,
    grpc.StatusCode.FAILED_PRECONDITION: 3,
    grpc.StatusCode.UNAVAILABLE: 4,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 4,
    grpc.StatusCode.DEADLINE_EXCEEDED: 5,
    grpc.StatusCode.UNAUTHENTICATED: 6,
    grpc.StatusCode.PERMISSION_DENIED: 6,
}
STAGES = {v: k.removeprefix("STAGE_").lower().replace("_", " ") for k, v in common_pb2.Stage.items()}
STEM_NAMES = {mixer_pb2.STEM_SPEECH: "speech", mixer_pb2.STEM_BGM: "bgm", mixer_pb2.STEM_MIX: "mix"}


class UsageError(Exception):
    pass


# ----- progress ---------------------------------------------------------------------
@dataclass
class ProgressBars:
    """One line per stage; redrawn in place on a terminal, printed once per stage otherwise."""

    stream: object = sys.stderr
    started: float = field(default_factory=time.monotonic)
    shown: dict[int, float] = field(default_factory=dict)
    quiet: bool = False

    def update(self, p: common_pb2.Progress) -> None:
        if self.quiet:
            return
        tty = getattr(self.stream, "isatty", lambda: False)()
        name = STAGES.get(p.stage, "?")
        width = 24
        filled = round(p.fraction * width)
        line = f"{name:<15} [{'#' * filled}{'-' * (width - filled)}] {p.fraction * 100:5.1f}%  {p.elapsed_s:6.1f}s"
        if p.message and p.fraction < 1:
            line += f"  {p.message[:50]}"
        if tty:
            print(f"\r\033[K{line}", end="" if p.fraction < 1 else "\n", file=self.stream, flush=True)  # type: ignore[call-overload]
        elif p.fraction >= 1 and self.shown.get(p.stage, 0) < 1:
            print(line, file=self.stream, flush=True)  # type: ignore[call-overload]
        self.shown[p.stage] = p.fraction

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)  # type: ignore[call-overload]


# ----- talking to a gateway ---------------------------------------------------------
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
    options.music.CopyFrom(music)
    if getattr(args, "duck_db", None) is not None:
        options.mix.duck_db = args.duck_db
    if getattr(args, "duck_sensitivity", None) is not None:
        options.mix.duck_sensitivity = args.duck_sensitivity
    if getattr(args, "loudness", None) is not None:
        options.mix.loudness_lufs = args.loudness
    if getattr(args, "stems", None):
        options.mix.return_stems.extend([mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_BGM, mixer_pb2.STEM_MIX])
    if getattr(args, "separation", None):
        options.separation_backend = args.separation
    return options


async def _requests(options: gateway_pb2.RemixOptions, path: Path,
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
    video_bytes: int = 0


async def run_job(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace, bars: ProgressBars,
                  analyze_only: bool) -> Outcome:
    source = Path(args.input)
    options = build_options(args, source.name)
    outcome = Outcome()
    accepted = asyncio.Event()
    call = (stub.Analyze if analyze_only else stub.Remix)(_requests(options, source, accepted), timeout=args.timeout)
    # Every file is written beside its target and renamed into place only once the whole
    # job has succeeded: a failure leaves the user's files as they were.
    with contextlib.ExitStack() as files:
        video_file = None if analyze_only else files.enter_context(paths.replacing(Path(args.output)))
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
            elif kind == "result":
                outcome.result = event
            elif kind == "video" and video_file is not None:
                video_file.write(event.video)
                outcome.video_bytes += len(event.video)
            elif kind == "stem" and args.stems:
                if event.stem.stem not in stems:
                    name = f"{STEM_NAMES.get(event.stem.stem, 'stem')}.wav"
                    stems[event.stem.stem] = files.enter_context(paths.replacing(Path(args.stems) / name))
                stems[event.stem.stem].write(event.stem.data)
        if video_file is not None and outcome.video_bytes == 0:
            raise RuntimeError("the gateway finished without sending a video")
    return outcome


def write_extras(args: argparse.Namespace, outcome: Outcome, bars: ProgressBars) -> None:
    from gateway import outputs

    if outcome.transcript is None or outcome.timeline is None:
        return
    transcript, timeline = outcome.transcript, outcome.timeline
    if args.srt:
        paths.write_bytes(Path(args.srt), outputs.srt(transcript).encode())
        bars.note(f"subtitles: {args.srt}")
    if args.vtt:
        paths.write_bytes(Path(args.vtt), outputs.vtt(transcript).encode())
        bars.note(f"subtitles: {args.vtt}")
    if args.timeline:
        paths.write_bytes(Path(args.timeline), outputs.timeline_json(transcript, timeline).encode())
        bars.note(f"timeline: {args.timeline}")
    if getattr(args, "plot", None):
        paths.write_with(Path(args.plot), lambda f: outputs.plot(f, Path(args.input), transcript, timeline))
        bars.note(f"plot: {args.plot}")


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


async def _with_gateway(args: argparse.Namespace, analyze_only: bool) -> int:
    bars = ProgressBars(quiet=args.quiet)
    running = None
    if args.gateway:
        from bgm.client import make_channel
        from bgm.security import channel_credentials
        from bgm.settings import SettingsError

        try:
            credentials = channel_credentials(args.tls_ca or "", args.tls_cert or "", args.tls_key or "")
        except SettingsError as exc:
            print(f"bgm: {exc}", file=sys.stderr)
            return 2
        token = args.token or os.environ.get("BGM_TOKEN", "")
        channel = make_channel(args.gateway, credentials=credentials, token=token,
                               max_message_bytes=vocab.CLI_MAX_MESSAGE_BYTES)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        except TimeoutError:
            await channel.close()
            print(f"bgm: cannot reach the gateway at {args.gateway} (is it running?)", file=sys.stderr)
            return 4
    else:
        from bgm import settings
        from bgm.server import start_server
        from gateway.servicer import GatewayServicer
        from gateway.settings import GatewaySettings

        bars.note("bgm: starting the services in-process and loading models...")
        server_settings = settings.server_settings(vocab.GATEWAY.name)
        from dataclasses import replace

        server_settings = replace(server_settings, host="127.0.0.1", port=0)
        servicer = GatewayServicer(settings.load(GatewaySettings, vocab.GATEWAY.env_prefix), server_settings)
        running = await start_server([servicer], server_settings)
        await running.wait_ready(timeout=900)
        channel = aio.insecure_channel(running.address, options=[
            ("grpc.max_receive_message_length", vocab.CLI_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", vocab.CLI_MAX_MESSAGE_BYTES)])
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.monotonic()
        outcome = await run_job(stub, args, bars, analyze_only)
        write_extras(args, outcome, bars)
        if not args.quiet:
            print(summary(outcome), file=sys.stderr)
        if not analyze_only:
            print(f"bgm: wrote {args.output} ({outcome.video_bytes / 2**20:.1f} MiB) in "
                  f"{time.monotonic() - started:.1f} s", file=sys.stderr)
        elif not args.timeline:
            from gateway import outputs

            if outcome.transcript is not None and outcome.timeline is not None:
                print(outputs.timeline_json(outcome.transcript, outcome.timeline))
        return 0
    except aio.AioRpcError as exc:
        print(f"\nbgm: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_CODES.get(exc.code(), 1)
    finally:
        await channel.close()
        if running is not None:
            await running.stop(1.0)


# ----- commands ---------------------------------------------------------------------
def _check_input(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no such file: {path}")
    if not p.is_file() or not os.access(p, os.R_OK):
        raise UsageError(f"cannot read {path}")


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path, checked before any work (exit 2 with the reason)."""
    named = [("-o", args.output), ("--srt", args.srt), ("--vtt", args.vtt), ("--timeline", args.timeline),
             ("--plot", args.plot)]
    files = [paths.Output(option, Path(value)) for option, value in named if value]
    stems = paths.Output("--stems", Path(args.stems)) if args.stems else None
    try:
        paths.check(Path(args.input), files, stems)
    except paths.OutputError as exc:
        raise UsageError(str(exc)) from None


def cmd_remix(args: argparse.Namespace) -> int:
    _check_input(args.input)
    if args.output is None:
        src = Path(args.input)
        args.output = str(src.with_name(f"{src.stem}.remixed{src.suffix or '.mp4'}"))
    _check_outputs(args)
    return asyncio.run(_with_gateway(args, analyze_only=False))


def cmd_analyze(args: argparse.Namespace) -> int:
    _check_input(args.input)
    args.output = None
    args.stems = None
    _check_outputs(args)
    return asyncio.run(_with_gateway(args, analyze_only=True))


def cmd_example(args: argparse.Namespace) -> int:
    from gateway.example import make_example

    out = make_example(Path(args.output), section_s=args.section)
    print(f"bgm: wrote example video {out}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.service in {s.name for s in vocab.BACKEND_SERVICES}:
        main = importlib.import_module(f"services.{args.service}.__main__").main
    else:  # gateway, or all: the gateway with the four services embedded
        if args.service == ALL_SERVICES:
            for service in vocab.BACKEND_SERVICES:
                os.environ.pop(f"{vocab.GATEWAY.env_prefix}_{service.name.upper()}_ADDRESS", None)
        from gateway.server import main
    main()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgm", description="Score a video with new background music that "
                                "follows the emotion of what is said.")
    sub = p.add_subparsers(dest="command", required=True)

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("input", help="video (or audio) file")
        sp.add_argument("--gateway", metavar="HOST:PORT", help="use a running gateway instead of in-process services")
        sp.add_argument("--token", help="bearer token for the gateway (default: $BGM_TOKEN)")
        sp.add_argument("--tls-ca", metavar="PEM", help="talk TLS to the gateway, trusting this CA")
        sp.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
        sp.add_argument("--tls-key", metavar="PEM", help="client certificate's key, for mutual TLS")
        sp.add_argument("--translate", action="store_true", help="translate non-English speech to English first")
        sp.add_argument("--language", help="spoken language (ISO 639-1); detected when omitted")
        sp.add_argument("--min-span", type=float, help="shortest emotion span in seconds (default 5)")
        sp.add_argument("--srt", metavar="FILE", help="write subtitles (SubRip)")
        sp.add_argument("--vtt", metavar="FILE", help="write subtitles (WebVTT)")
        sp.add_argument("--timeline", metavar="FILE", help="write the emotion timeline and transcript as JSON")
        sp.add_argument("--plot", metavar="FILE", help="write a PNG of the emotion timeline over the waveform")
        sp.add_argument("--timeout", type=float, default=6 * 3600, help="overall deadline in seconds")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    remix = sub.add_parser("remix", help="replace a video's music with new music that follows its emotions")
    job_args(remix)
    remix.add_argument("-o", "--output", help="output file (default: INPUT.remixed.EXT)")
    remix.add_argument("--music-backend", choices=list(vocab.MUSIC_BACKENDS))
    remix.add_argument("--seed", type=int, help="music seed: the same seed gives the same music")
    remix.add_argument("--tempo", type=float, help="force one tempo (BPM)")
    remix.add_argument("--duck-db", type=float, help="how far the music dips under speech (dB, default 12)")
    remix.add_argument("--duck-sensitivity", type=float, metavar="0..1",
                       help="how readily the music ducks for what may be speech (default 0.5; higher ducks "
                            "for softer speech)")
    remix.add_argument("--loudness", type=float, help="loudness target in LUFS (default -14)")
    remix.add_argument("--separation", choices=list(vocab.SEPARATION_BACKENDS), help="speech separation backend")
    remix.add_argument("--stems", metavar="DIR", help="also write speech, bgm and mix WAV stems here")
    remix.set_defaults(func=cmd_remix)

    analyze = sub.add_parser("analyze", help="transcript and emotion timeline only (JSON on stdout)")
    job_args(analyze)
    analyze.set_defaults(func=cmd_analyze)

    example = sub.add_parser("example", help="make the example video (colour bars, speech, a music bed)")
    example.add_argument("output", nargs="?", default="demo.mp4")
    example.add_argument("--section", type=float, default=10.0, help="seconds per emotion section")
    example.set_defaults(func=cmd_example)

    serve = sub.add_parser("serve", help="run a service (port from BGM_<SERVICE>_PORT)")
    serve.add_argument("service", choices=[*(s.name for s in vocab.SERVICES), ALL_SERVICES])
    serve.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("BGM_LOG_LEVEL", "WARNING")
    from bgm import logs

    if args.command in ("remix", "analyze"):
        logs.configure("bgm-cli", os.environ.get("BGM_CLI_LOG_LEVEL", "WARNING"))
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"bgm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbgm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
