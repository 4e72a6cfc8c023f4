"""The VAD run on the speech track while it arrives.

The gateway streams the speech into MixAndMux as it is separated; on an hour the VAD over it
took 18 s that all came after the last chunk, with the mix waiting on it. Run as the chunks
land, only the last 32 s are left once the track is complete. The thread runs at a low
priority: while separation and transcription hold both cores it waits, and it catches up
on the core transcription leaves free when it ends.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from bgm import logs
from services.mixer import activity, sources

NICENESS = 10
log = logs.get("bgm.mixer")


class Landed(Protocol):
    available: int  # samples readable

    def read(self, lo: int, hi: int) -> np.ndarray: ...


class FollowingVad:
    """``activity.StreamedVad`` over a track still arriving: told how far it has grown
    (``grew``), it runs what has landed, one 32 s run at a time; ``finish`` runs the rest
    once the track is complete. ``landed(mark)`` opens what has landed by the last ``mark``
    given to ``grew`` (``sources.PcmFile`` or ``sources.FlacTrack``)."""

    def __init__(self, landed: Callable[[int], Landed], length: int) -> None:
        self.landed, self.length = landed, length
        self.vad = activity.StreamedVad(length)
        self.written = 0
        self.lock = threading.Lock()  # one run at a time, from this thread or ``finish``'s
        self.wake = threading.Event()
        self.stopped = False
        self.failed = False
        self.thread = threading.Thread(target=self._follow, name="bgm-following-vad", daemon=True)
        self.thread.start()

    def grew(self, written: int) -> None:
        """The track has grown to ``written`` (bytes, handed to ``landed``)."""
        self.written = written
        self.wake.set()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def _follow(self) -> None:
        with contextlib.suppress(OSError):  # a lower priority is a courtesy, not a need
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        while not self.stopped:
            self.wake.wait()
            self.wake.clear()
            while not self.stopped:
                with self.lock:
                    if self.stopped:
                        return
                    try:
                        track = self.landed(self.written)
                        ran = self.vad.advance(track.read, track.available, runs=1)
                    except Exception as exc:  # ``finish`` runs the whole track again
                        self.failed = True
                        log.warning("the VAD could not follow the speech as it arrived",
                                    extra={"fields": {"error": str(exc)[:200]}})
                        return
                if not ran:
                    break

    def finish(self, track: sources.Source) -> np.ndarray:
        """The speech probability per window of the complete ``track`` (the same track)."""
        self.stop()
        with self.lock:
            if self.failed:
                return activity.speech_probability_of(track)
            return self.vad.finish(track.read)
