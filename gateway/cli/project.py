"""A project folder (``--project DIR``): what a run keeps so that the next run on the same
video, with an edited timeline, redoes only what changed.

    DIR/project.json     marks the folder as bgm's (``bgm clean`` removes nothing else's)
    DIR/timeline.json    the timeline of the last run, to edit and pass to --timeline-in
    DIR/cache/audio/     the video's decoded audio, by content (the gateway's BGM_GATEWAY_CACHE_DIR)
    DIR/cache/speech/    separated speech, by content (the mixer's BGM_MIXER_CACHE_DIR)
    DIR/cache/music/     rendered spans, by content (the music service's BGM_MUSIC_CACHE_DIR)

The caches belong to the services: in-process they are pointed here; a remote gateway's
services keep their own (the same settings), and the folder then holds the timeline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bgm import vocab

MARKER = "project.json"
TIMELINE = "timeline.json"
CACHE = "cache"
OWNED = (MARKER, TIMELINE, CACHE)


class ProjectError(Exception):
    """A folder that cannot be used (or removed) as a project; the message says why."""


def _is_project(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def prepare(folder: Path, source: Path, in_process: bool) -> None:
    """Create (or reopen) the project folder; in-process services cache into it."""
    if folder.exists() and not folder.is_dir():
        raise ProjectError(f"--project: {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _is_project(folder):
        raise ProjectError(f"--project: {folder} already holds files that are not a bgm project; "
                           "choose a new or empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(json.dumps({"bgm_project": 1, "input": str(source.resolve())}, indent=2) + "\n")
    except OSError as exc:
        raise ProjectError(f"--project: cannot write to {folder} ({exc.strerror})") from None
    if in_process:
        os.environ.update(cache_settings(folder))


def cache_settings(folder: Path) -> dict[str, str]:
    """The settings that point in-process services' caches into the project folder."""
    return {f"{vocab.MUSIC.env_prefix}_CACHE_DIR": str(folder / CACHE / vocab.MUSIC.name),
            f"{vocab.MIXER.env_prefix}_CACHE_DIR": str(folder / CACHE / "speech"),
            f"{vocab.GATEWAY.env_prefix}_CACHE_DIR": str(folder / CACHE / "audio")}


def timeline_path(folder: Path) -> Path:
    return folder / TIMELINE


def clean(folder: Path) -> list[str]:
    """Remove what bgm keeps in the project folder, and the folder when nothing else is left.
    Returns what stays (files that are not bgm's)."""
    if not folder.is_dir():
        raise ProjectError(f"no such folder: {folder}")
    if not _is_project(folder):
        raise ProjectError(f"{folder} is not a bgm project folder (it has no {MARKER}); nothing removed")
    for name in OWNED:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    left = sorted(p.name for p in folder.iterdir())
    if not left:
        folder.rmdir()
    return left
