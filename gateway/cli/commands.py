"""What each ``bgm`` subcommand does."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
from pathlib import Path

import grpc
from grpc import aio

from bgm import vocab
from bgm.settings import SettingsError
from bgm.v1 import gateway_pb2_grpc
from gateway.cli import connect, files, project
from gateway.cli.job import Outcome, run_job, summary
from gateway.cli.progress import ProgressBars

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


class UsageError(Exception):
    """Bad usage, an input that cannot be read or an output that cannot be written (exit 2)."""


class TimelineRefused(Exception):
    """An edited timeline (--timeline-in) that cannot be used (exit 3, as INVALID_ARGUMENT)."""


def _check_input(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no such file: {path}")
    if not p.is_file() or not os.access(p, os.R_OK):
        raise UsageError(f"cannot read {path}")


def _check_outputs(args: argparse.Namespace) -> None:
    try:
        files.check_args(args)
    except files.OutputError as exc:
        raise UsageError(str(exc)) from None


async def _job(args: argparse.Namespace, analyze_only: bool) -> int:
    bars = ProgressBars(quiet=args.quiet)
    try:
        async with connect.channel_for(args, bars) as channel:
            started = time.monotonic()
            outcome = await run_job(gateway_pb2_grpc.GatewayStub(channel), args, bars, analyze_only)
    except SettingsError as exc:
        print(f"bgm: {exc}", file=sys.stderr)
        return 2
    except connect.Unreachable as exc:
        print(f"bgm: {exc}", file=sys.stderr)
        return 4
    except aio.AioRpcError as exc:
        print(f"\nbgm: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_CODES.get(exc.code(), 1)
    if outcome.transcript is not None and outcome.timeline is not None:
        files.write_extras(args, outcome.transcript, outcome.timeline, bars.note, outcome.music)
        if getattr(args, "project", None):
            saved = project.timeline_path(Path(args.project))
            files.write_bytes(saved, outputs_json(outcome).encode())
            bars.note(f"project: {args.project} (edit {saved} and run again with --timeline-in {saved})")
    if not args.quiet:
        print(summary(outcome), file=sys.stderr)
    if not analyze_only:
        print(f"bgm: wrote {args.output} ({outcome.video_bytes / 2**20:.1f} MiB) in "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    elif not args.timeline and outcome.transcript is not None and outcome.timeline is not None:
        from gateway import outputs

        print(outputs.timeline_json(outcome.transcript, outcome.timeline))
    return 0


def outputs_json(outcome: Outcome) -> str:
    from gateway import outputs

    assert outcome.transcript is not None and outcome.timeline is not None
    return outputs.timeline_json(outcome.transcript, outcome.timeline, outcome.music)


def _prepare(args: argparse.Namespace) -> None:
    """The edited timeline and the project folder, checked before any work starts."""
    args.edited_timeline = None
    if args.timeline_in:
        from gateway import timeline

        try:
            text = Path(args.timeline_in).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--timeline-in: cannot read {args.timeline_in} ({exc})") from None
        try:
            args.edited_timeline = timeline.from_json(text, new_seed=getattr(args, "seed", None) is not None)
        except timeline.TimelineError as exc:
            raise TimelineRefused(f"--timeline-in {args.timeline_in}: {exc}") from None
    if args.project:
        try:
            project.prepare(Path(args.project), Path(args.input), in_process=not args.gateway)
        except project.ProjectError as exc:
            raise UsageError(str(exc)) from None


def remix(args: argparse.Namespace) -> int:
    _check_input(args.input)
    if args.output is None:
        src = Path(args.input)
        args.output = str(src.with_name(f"{src.stem}.remixed{src.suffix or '.mp4'}"))
    _check_outputs(args)
    _prepare(args)
    return asyncio.run(_job(args, analyze_only=False))


def analyze(args: argparse.Namespace) -> int:
    _check_input(args.input)
    args.output = None
    args.stems = None
    _check_outputs(args)
    _prepare(args)
    return asyncio.run(_job(args, analyze_only=True))


def clean(args: argparse.Namespace) -> int:
    try:
        left = project.clean(Path(args.project))
    except project.ProjectError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot remove {args.project}: {exc}") from None
    if left:
        print(f"bgm: removed bgm's files from {args.project}; kept what is not bgm's: {', '.join(left)}",
              file=sys.stderr)
    else:
        print(f"bgm: removed {args.project}", file=sys.stderr)
    return 0


def example(args: argparse.Namespace) -> int:
    from gateway.example import make_example

    out = make_example(Path(args.output), section_s=args.section)
    print(f"bgm: wrote example video {out}", file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    if args.service in {s.name for s in vocab.BACKEND_SERVICES}:
        main = importlib.import_module(f"services.{args.service}.__main__").main
    else:  # gateway, or all: the gateway with the four services embedded
        if args.service == ALL_SERVICES:
            for service in vocab.BACKEND_SERVICES:
                os.environ.pop(f"{vocab.GATEWAY.env_prefix}_{service.name.upper()}_ADDRESS", None)
        from gateway.server import main
    main()
    return 0
