"""The C allocator tuned for a process that handles audio in large blocks from many threads.

glibc's defaults suit small, short-lived objects: each thread that allocates gets an arena of
its own (up to 8 per core), and a freed block of a few MB raises the threshold above which
blocks are mapped (and handed back to the system when freed) up to 32 MB. Blocks of audio,
features and model activations, allocated from worker threads, then stay in fragmented
arenas: resident memory grew by hundreds of MB over a long remix and was never returned.
Two arenas, and every block of 4 MiB or more mapped on its own, keep it near what is in
use (``bench.longform``: figures in the README). 1 MiB kept a little less (the STT service
transcribing 10 minutes: 506 MB, 552 at 4 MiB, 683 untuned) but cost the speed of mapping
and zeroing each block afresh (53 s against 43 s). Applied by ``bgm.server.start_server``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from bgm import logs

log = logs.get("bgm.memory")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 4 << 20
ARENA_MAX = 2
_tuned = False


def tune_allocator() -> bool:
    """Apply the settings above once per process, unless the operator set glibc's own
    (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_) or BGM_MALLOC_TUNING=0; False where the C
    library is not glibc or the tuning is off."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("BGM_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = True
    if "MALLOC_ARENA_MAX" not in os.environ:
        applied = mallopt(M_ARENA_MAX, ARENA_MAX) == 1 and applied
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and applied
    if not applied:
        log.warning("could not tune the C allocator; memory may grow with long inputs")
    _tuned = applied
    return applied
