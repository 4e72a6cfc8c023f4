"""Progress on the terminal: one line per stage."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from bgm.v1 import common_pb2

STAGES = {v: k.removeprefix("STAGE_").lower().replace("_", " ") for k, v in common_pb2.Stage.items()}


def format_left(seconds: float) -> str:
    """``45 s``, ``3 min 05 s``, ``1 h 02 min``: as precise as an estimate deserves."""
    whole = max(1, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


@dataclass
class ProgressBars:
    """One line per stage; redrawn in place on a terminal, printed once per stage otherwise."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    started: float = field(default_factory=time.monotonic)
    shown: dict[int, float] = field(default_factory=dict)
    quiet: bool = False

    def update(self, p: common_pb2.Progress) -> None:
        if self.quiet:
            return
        tty = self.stream.isatty()
        name = STAGES.get(p.stage, "?")
        width = 24
        filled = round(p.fraction * width)
        line = f"{name:<15} [{'#' * filled}{'-' * (width - filled)}] {p.fraction * 100:5.1f}%  {p.elapsed_s:6.1f}s"
        if p.eta_s > 0 and p.fraction < 1:
            line += f"  about {format_left(p.eta_s)} left"
        if p.message and p.fraction < 1:
            line += f"  {p.message[:50]}"
        if tty:
            print(f"\r\033[K{line}", end="" if p.fraction < 1 else "\n", file=self.stream, flush=True)
        elif p.fraction >= 1 and self.shown.get(p.stage, 0) < 1:
            print(line, file=self.stream, flush=True)
        self.shown[p.stage] = p.fraction

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)
