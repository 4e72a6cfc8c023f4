"""DeepFilterNet's runtime in a process of its own: mono float32 frames in on stdin, the
runtime's output for each frame out on stdout, frame for frame, until stdin ends.

Run as a script by ``separation.DeepFilterNet`` (it imports nothing of the project). The
runtime is called once per 10 ms frame; from a thread of a busy server process each call
waited for the GIL on its way back (a 30 s recording took 4.8 s alone and 22.4 s beside one
thread running Python), so the calls are made here, where no other thread wants it.

    python dfn_worker.py LIBRARY MODEL ATTENUATION_LIMIT_DB
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

READ_BYTES = 1 << 20


def bind(library: str) -> ctypes.CDLL:
    """The runtime's C library with its functions' signatures (the server loads it too, to
    check at start that the model opens)."""
    lib = ctypes.CDLL(library)
    lib.df_create.restype = ctypes.c_void_p
    lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    lib.df_get_frame_length.restype = ctypes.c_size_t
    lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
    lib.df_process_frame.restype = ctypes.c_float
    lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]
    lib.df_free.argtypes = [ctypes.c_void_p]
    return lib


def main(library: str, model: str, attenuation_limit_db: float) -> int:
    lib = bind(library)
    state = lib.df_create(model.encode(), attenuation_limit_db, None)
    if not state:
        print("DeepFilterNet failed to load its model", file=sys.stderr)
        return 2
    n = int(lib.df_get_frame_length(state))
    frame_bytes = n * 4
    out = sys.stdout.buffer
    pending = b""
    try:
        while data := os.read(0, READ_BYTES):  # what has arrived: all of it is answered, then flushed
            pending += data
            whole = len(pending) // frame_bytes
            if not whole:
                continue
            frames = np.frombuffer(pending[: whole * frame_bytes], dtype="<f4").copy()
            pending = pending[whole * frame_bytes :]
            made = np.empty_like(frames)
            pointer = ctypes.POINTER(ctypes.c_float)
            for k in range(whole):
                lib.df_process_frame(state, frames[k * n :].ctypes.data_as(pointer),
                                     made[k * n :].ctypes.data_as(pointer))
            out.write(made.tobytes())
            out.flush()
    except BrokenPipeError:  # the reader has what it wanted
        return 0
    finally:
        lib.df_free(state)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
