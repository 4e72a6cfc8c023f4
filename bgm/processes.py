"""Child processes (ffmpeg, ffprobe) and in-process loops that end with the request that started them.

Blocking work runs in worker threads, which asyncio cannot cancel. So every child is
registered with the request it serves (a context variable, which ``asyncio.to_thread``
carries into the thread), and when the request ends early (the client cancelled or
went away, or another stage failed) its children are killed at once instead of running
on for seconds. Work done in the process itself (FluidSynth, Whisper) cannot be killed, so
its loops ask ``check_request()`` as they go.
"""

from __future__ import annotations

import contextlib
import contextvars
import subprocess
import threading
from collections.abc import Iterator, Sequence
from typing import Any

_owner: contextvars.ContextVar[Children | None] = contextvars.ContextVar("children", default=None)


class Children:
    """The live child processes of one request."""

    def __init__(self) -> None:
        self._live: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self.closed = False

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            if self.closed:  # the request already ended: do not start its work
                proc.kill()
            self._live.add(proc)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._live.discard(proc)

    def kill_all(self) -> int:
        with self._lock:
            self.closed = True
            live = [p for p in self._live if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return len(live)


class RequestEnded(Exception):
    """The request this work serves has ended: in-process work stops where it checks."""


def check_request() -> None:
    """Raise RequestEnded if the current request has ended; for long in-process loops, which
    no kill reaches (call it every ~0.1 s)."""
    owner = _owner.get()
    if owner is not None and owner.closed:
        raise RequestEnded("the request ended; its work stopped")


@contextlib.contextmanager
def owned_by_request() -> Iterator[Children]:
    """Children started inside the block (in this task or threads it starts) are killed
    when the block ends."""
    children = Children()
    token = _owner.set(children)
    try:
        yield children
    finally:
        children.kill_all()
        with contextlib.suppress(ValueError):  # a generator may be closed in another context
            _owner.reset(token)


@contextlib.contextmanager
def child(cmd: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``subprocess.Popen`` registered with the current request; killed if still running at the end."""
    with subprocess.Popen(list(cmd), **popen) as proc, adopted(proc):
        yield proc


@contextlib.contextmanager
def adopted(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """A child started before the request it now serves (a worker kept warm), registered
    with it from here on; killed if still running at the end."""
    owner = _owner.get()
    if owner is not None:
        owner.add(proc)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        if owner is not None:
            owner.discard(proc)


def run(cmd: Sequence[str], timeout: float, input: bytes | None = None,
        stdin: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """Like ``subprocess.run(capture_output=True)``, but owned by the current request."""
    stdin = subprocess.PIPE if input is not None else stdin
    with child(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
