"""Results by content: arrays kept under a key made from everything that determines them,
so asking again for the same thing costs a lookup instead of the work.

Two levels: a small in-memory LRU (bounded in bytes) and, when a folder is configured, that
folder (bounded too; least recently used files go first). A re-render of an edited timeline
finds every unchanged span's music here, and a second run on the same video its separated
speech. Files are written beside their final name and renamed, so a reader never sees half
of one and a crash leaves nothing a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bgm import logs, vocab

log = logs.get("bgm.cache")
SUFFIX = ".npy"
FILE_SUFFIX = ".raw"  # a file kept as it is (``put_file``): never loaded into memory
ARRAYS_SUFFIX = ".npz"  # named arrays kept and read together (``put_arrays``): disk only


def file_digest(path: str | Path) -> str:
    """A file's content as a key part (sha256: about 1 GB/s here)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def key(*parts: object) -> str:
    """A key for ``parts`` (numbers, strings, arrays: an array counts by its bytes)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(f"<{part.dtype.str}{part.shape}>".encode())
            digest.update(np.ascontiguousarray(part).data)
        else:
            digest.update(repr(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass
class Pending:
    """A cache file being written (``ArrayCache.writing``)."""

    file: BinaryIO
    keep: bool = False


class ArrayCache:
    def __init__(self, folder: str = "", memory_bytes: int = 256 * vocab.MIB,
                 disk_bytes: int = 4096 * vocab.MIB) -> None:
        self.folder = Path(folder) if folder else None
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{name}{SUFFIX}"

    def get(self, name: str) -> np.ndarray | None:
        with self._lock:
            if name in self._memory:
                self._memory.move_to_end(name)
                return self._memory[name]
        if self.folder is None:
            return None
        path = self._path(name)
        try:
            array = np.load(path, allow_pickle=False)
            os.utime(path)  # recently used: evicted last
        except (OSError, ValueError):
            return None
        self._remember(name, array)
        return array

    def put(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        array.setflags(write=False)  # shared with every later reader
        self._remember(name, array)
        if self.folder is not None:
            try:
                self._write(name, array)
            except OSError as exc:  # a full or read-only cache costs speed, never the request
                log.warning("cannot write to the cache", extra={"fields": {"folder": str(self.folder),
                                                                          "error": str(exc)}})

    def get_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays kept together under ``name`` (``put_arrays``), or None."""
        if self.folder is None:
            return None
        path = self.folder / f"{name}{ARRAYS_SUFFIX}"
        try:
            with np.load(path, allow_pickle=False) as loaded:
                arrays = {part: loaded[part] for part in loaded.files}
            os.utime(path)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            return None
        return arrays

    def put_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Keep ``arrays`` together under ``name``, on disk only (a reader gets all or none)."""
        try:
            with self.writing(name, ARRAYS_SUFFIX) as pending:
                if pending is not None:
                    np.savez(pending.file, allow_pickle=False, **arrays)
                    pending.keep = True
        except OSError as exc:
            self.cannot_write(exc)

    def kept_file(self, name: str) -> Path | None:
        """Where the file kept under ``name`` lies (now marked recently used), or None. Open it
        at once: an eviction then removes the name, never what a reader has open."""
        if self.folder is None:
            return None
        kept = self.folder / f"{name}{FILE_SUFFIX}"
        try:
            os.utime(kept)
        except OSError:
            return None
        return kept

    def get_file(self, name: str, into: Path) -> bool:
        """The file kept under ``name`` put at ``into`` (linked where the folders share a disk,
        else copied); False when none is kept."""
        kept = self.kept_file(name)
        if kept is None:
            return False
        try:
            try:
                os.link(kept, into)
            except OSError:
                shutil.copyfile(kept, into)
        except OSError:
            into.unlink(missing_ok=True)
            return False
        return True

    def put_file(self, name: str, path: Path) -> None:
        """Keep a copy of the file at ``path`` under ``name`` (no memory level: files are big)."""
        try:
            with self.writing(name) as pending:
                if pending is not None:
                    with open(path, "rb") as source:
                        shutil.copyfileobj(source, pending.file)
                    pending.keep = True
        except OSError as exc:
            self.cannot_write(exc)

    @contextlib.contextmanager
    def writing(self, name: str, suffix: str = FILE_SUFFIX) -> Iterator[Pending | None]:
        """A file to write ``name``'s content into, a piece at a time; kept (renamed into place)
        only when the caller sets ``keep`` and the block ends without an error. None when no
        folder is set or it cannot be written: a cache that fails costs speed, never the
        request (a caller's write that fails should stop keeping, likewise)."""
        if self.folder is None:
            yield None
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=self.folder)
        except OSError as exc:
            self.cannot_write(exc)
            yield None
            return
        try:
            with os.fdopen(fd, "wb") as f:
                pending = Pending(f)
                yield pending
            if pending.keep:
                try:
                    os.replace(tmp, self.folder / f"{name}{suffix}")
                except OSError as exc:
                    self.cannot_write(exc)
                    pending.keep = False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if pending.keep:
            self._evict()

    def cannot_write(self, exc: OSError) -> None:
        log.warning("cannot write to the cache", extra={"fields": {"folder": str(self.folder), "error": str(exc)}})

    def _remember(self, name: str, array: np.ndarray) -> None:
        if array.nbytes > self.memory_bytes:
            return
        with self._lock:
            if name in self._memory:
                return
            self._memory[name] = array
            self._held += array.nbytes
            while self._held > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self._held -= old.nbytes

    def _write(self, name: str, array: np.ndarray) -> None:
        with self.writing(name, SUFFIX) as pending:
            if pending is not None:  # None: the folder cannot be written (already logged)
                np.save(pending.file, array, allow_pickle=False)
                pending.keep = True

    def _evict(self) -> None:
        assert self.folder is not None
        entries = []
        for path in [*self.folder.glob(f"*{SUFFIX}"), *self.folder.glob(f"*{FILE_SUFFIX}"),
                     *self.folder.glob(f"*{ARRAYS_SUFFIX}")]:
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.disk_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
