"""Temporary files of a request, named so that a restarted process can clean up after a
killed one.

Every name carries the owning process id (``bgm-mix-4242-k3j9``). At start-up, what a dead
process left behind is removed; a process that is alive keeps its files, so services
sharing one temp folder on a host never touch each other's work.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from bgm import logs

log = logs.get("bgm.scratch")
_OWNED = re.compile(r"^bgm-(?:[a-z]+-)?(\d+)-")
_swept: set[str] = set()


def prefix(kind: str = "") -> str:
    """``bgm-mix-<pid>-`` (or ``bgm-<pid>-``): the start of every temp name this process makes."""
    return f"bgm-{kind + '-' if kind else ''}{os.getpid()}-"


def workdir(kind: str, where: str = "") -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix(kind), dir=where or None)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep(where: str = "") -> int:
    """Remove what dead bgm processes left in ``where`` (the system temp folder by default);
    once per folder and process. Returns how many entries went."""
    folder = Path(where or tempfile.gettempdir())
    if str(folder) in _swept:
        return 0
    _swept.add(str(folder))
    removed = 0
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            owner = _OWNED.match(entry.name)
            if owner is None or _alive(int(owner.group(1))):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    if removed:
        log.info("removed temp files of stopped processes", extra={"fields": {"folder": str(folder), "count": removed}})
    return removed
