"""The CLI's output files: checked before any work starts, written so that a failure never
leaves a half-written file or replaces one the user still needs; and what goes in them
beside the video (subtitles, the timeline, the plot).

Every output must differ from the input and from every other output, must not be an
existing folder (the stems folder must not be an existing file), and its folder must exist
or be creatable and writable. Files are written beside their target and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bgm.v1 import gateway_pb2, music_pb2

STEM_FILES = ("speech.wav", "bgm.wav", "mix.wav", "music.wav")


class OutputError(Exception):
    """An output path the CLI must not write; the message says which option and why."""


@dataclass(frozen=True)
class Output:
    option: str  # as the user typed it: "-o", "--srt"
    path: Path


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _ready_folder(option: str, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{option}: cannot create the folder {folder} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: the folder {folder} is not writable")


def check(source: Path, files: list[Output], stems: Output | None = None) -> None:
    """Refuse (OutputError) any output that would overwrite the input or another output, or
    that cannot be written; create missing folders."""
    targets = list(files)
    if stems is not None:
        targets += [Output(f"{stems.option} ({name})", stems.path / name) for name in STEM_FILES]
    for i, out in enumerate(targets):
        if _same(out.path, source):
            raise OutputError(f"{out.option} {out.path} would overwrite the input; choose another file")
        for other in targets[:i]:
            if _same(out.path, other.path):
                raise OutputError(f"{out.option} and {other.option} both name {out.path}; give each its own file")
    for out in files:
        if out.path.is_dir():
            raise OutputError(f"{out.option}: {out.path} is a folder; give a file name")
        _ready_folder(out.option, out.path.parent if str(out.path.parent) else Path("."))
    if stems is not None:
        _ready_folder(stems.option, stems.path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[IO[bytes]]:
    """A file that becomes ``path`` only when the block ends without an error."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        # mkstemp makes the file private (0600); the user's output gets the usual mode.
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as f:
        f.write(data)


def write_with(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    with replacing(path) as f:
        write(f)


def check_args(args: argparse.Namespace) -> None:
    """Every output path the command line names, checked (OutputError with the reason)."""
    named = [("-o", args.output), ("--srt", args.srt), ("--vtt", args.vtt), ("--timeline", args.timeline),
             ("--plot", args.plot)]
    outputs = [Output(option, Path(value)) for option, value in named if value]
    if getattr(args, "project", None):
        from gateway.cli.project import timeline_path

        outputs.append(Output("--project (timeline.json)", timeline_path(Path(args.project))))
    stems = Output("--stems", Path(args.stems)) if args.stems else None
    check(Path(args.input), outputs, stems)


def write_extras(args: argparse.Namespace, transcript: gateway_pb2.Transcript,
                 timeline: gateway_pb2.EmotionTimeline, note: Callable[[str], None],
                 music: music_pb2.MusicHeader | None = None) -> None:
    """Subtitles, the timeline and the plot, as the command line asked."""
    from gateway import outputs

    if args.srt:
        write_bytes(Path(args.srt), outputs.srt(transcript).encode())
        note(f"subtitles: {args.srt}")
    if args.vtt:
        write_bytes(Path(args.vtt), outputs.vtt(transcript).encode())
        note(f"subtitles: {args.vtt}")
    if args.timeline:
        write_bytes(Path(args.timeline), outputs.timeline_json(transcript, timeline, music).encode())
        note(f"timeline: {args.timeline}")
    if args.plot:
        fmt = args.plot_format or ("svg" if args.plot.lower().endswith(".svg") else "png")
        write_with(Path(args.plot), lambda f: outputs.plot(f, Path(args.input), transcript, timeline, fmt))
        note(f"plot: {args.plot}")
