"""Stopping Whisper between model calls when its request is cancelled.

One call into CTranslate2 cannot be interrupted, but faster-whisper makes several per 30 s
window (encode, generate, and up to five more generates when it falls back to sampling,
align for word timestamps), and yields a segment only when the window is done. Checking
the request's cancel flag before each call stops the work within one call rather than
one window (measured by ``python -m bench.cancel``).

The model is shared by concurrent requests, each transcribed in a thread of its own, so
the flag in force is the one set for the calling thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# CTranslate2 Whisper's methods that run the model.
MODEL_STEPS = frozenset({"encode", "generate", "align", "detect_language"})


class Cancelled(Exception):
    """The request was cancelled; Whisper stopped before its next model call."""


class _Flag(threading.local):
    event: threading.Event | None = None


_FLAG = _Flag()


@contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Model calls made by this thread inside the block raise Cancelled once ``event`` is set."""
    previous, _FLAG.event = _FLAG.event, event
    try:
        yield
    finally:
        _FLAG.event = previous


def _check() -> None:
    event = _FLAG.event
    if event is not None and event.is_set():
        raise Cancelled


class CancellableWhisper:
    """A CTranslate2 Whisper model that checks the calling thread's cancel flag before each step."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        if name not in MODEL_STEPS:
            return attr
        return _checked(attr)


def _checked(step: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        _check()
        return step(*args, **kwargs)

    return run
