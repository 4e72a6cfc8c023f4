"""FluidSynth in the music service's own process (libfluidsynth through ctypes).

The ``fluidsynth`` command loads the 148 MB General MIDI soundfont on every run (about
0.2 s) and writes a WAV that is read back; a span of a re-rendered timeline waited mostly
for that. Here one resident synth keeps the soundfont's samples loaded (libfluidsynth
shares them between synths of a process), and each render gets a fresh synth of its own,
so renders never share state and run side by side in threads. The audio is sample for
sample what ``fluidsynth -F`` writes for the same MIDI file and settings.

A render checks every ~0.1 s whether its request has ended (``bgm.processes``), so a
cancelled call stops within a second, as a killed child process would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading

import numpy as np

from bgm import processes
from bgm.errors import Unsupported

# FluidSynth's own period: the MIDI player advances between blocks, so a larger block would
# move notes onto block edges (the audio changes with any other size).
BLOCK = 64
CHECK_EVERY = 64  # blocks between checks for a request that ended (~85 ms at 48 kHz)
GAIN = 0.5  # as the composer always rendered (``fluidsynth -g 0.5``)
_VP = ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("fluidsynth") or "libfluidsynth.so.3"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise Unsupported("FluidSynth is not installed (Debian: apt-get install fluidsynth)") from None
    signatures: dict[str, tuple[list[object], object]] = {
        "new_fluid_settings": ([], _VP),
        "delete_fluid_settings": ([_VP], None),
        "fluid_settings_setnum": ([_VP, ctypes.c_char_p, ctypes.c_double], ctypes.c_int),
        "fluid_settings_setint": ([_VP, ctypes.c_char_p, ctypes.c_int], ctypes.c_int),
        "fluid_settings_setstr": ([_VP, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int),
        "new_fluid_synth": ([_VP], _VP),
        "delete_fluid_synth": ([_VP], None),
        "fluid_synth_sfload": ([_VP, ctypes.c_char_p, ctypes.c_int], ctypes.c_int),
        "fluid_synth_write_float": ([_VP, ctypes.c_int, _VP, ctypes.c_int, ctypes.c_int, _VP, ctypes.c_int,
                                     ctypes.c_int], ctypes.c_int),
        "new_fluid_player": ([_VP], _VP),
        "delete_fluid_player": ([_VP], None),
        "fluid_player_add_mem": ([_VP, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int),
        "fluid_player_play": ([_VP], ctypes.c_int),
        "fluid_player_stop": ([_VP], ctypes.c_int),
        "fluid_player_join": ([_VP], ctypes.c_int),
        "fluid_set_log_function": ([ctypes.c_int, _VP, _VP], _VP),
    }
    for function, (args, result) in signatures.items():
        getattr(lib, function).argtypes = args
        getattr(lib, function).restype = result
    for level in range(5):  # quiet, as ``fluidsynth -q``: failures are reported by return codes
        lib.fluid_set_log_function(level, None, None)
    return lib


class Synth:
    """Renders Standard MIDI Files with one soundfont; thread-safe (a synth per render)."""

    def __init__(self, soundfont: str) -> None:
        self.lib = _library()
        self.soundfont = soundfont.encode()
        self.lock = threading.Lock()
        # Holds the soundfont's samples in libfluidsynth's cache for the renders' synths.
        self._settings, self._resident = self._new_synth(44_100)

    def _new_synth(self, sample_rate: int) -> tuple[int, int]:
        lib = self.lib
        settings = lib.new_fluid_settings()
        lib.fluid_settings_setnum(settings, b"synth.sample-rate", float(sample_rate))
        lib.fluid_settings_setnum(settings, b"synth.gain", GAIN)
        lib.fluid_settings_setint(settings, b"synth.reverb.active", 1)
        lib.fluid_settings_setint(settings, b"synth.chorus.active", 0)
        lib.fluid_settings_setint(settings, b"synth.lock-memory", 0)
        lib.fluid_settings_setstr(settings, b"player.timing-source", b"sample")  # rendering, not playing
        synth = lib.new_fluid_synth(settings)
        if not synth or lib.fluid_synth_sfload(synth, self.soundfont, 1) < 0:
            if synth:
                lib.delete_fluid_synth(synth)
            lib.delete_fluid_settings(settings)
            raise Unsupported(f"FluidSynth could not load the soundfont {self.soundfont.decode()}")
        return settings, synth

    def render(self, midi: bytes, frames: int, sample_rate: int) -> np.ndarray:
        """``frames`` of stereo float32 audio of ``midi`` from its start (notes still sounding
        at the end ring on to it; the MIDI may end earlier)."""
        lib = self.lib
        settings, synth = self._new_synth(sample_rate)
        player = lib.new_fluid_player(synth)
        try:
            if not player or lib.fluid_player_add_mem(player, midi, len(midi)) != 0:
                raise RuntimeError("FluidSynth refused the score's MIDI data")
            lib.fluid_player_play(player)
            left = np.zeros(frames, dtype=np.float32)
            right = np.zeros(frames, dtype=np.float32)
            at_left, at_right = left.ctypes.data, right.ctypes.data
            for count, start in enumerate(range(0, frames, BLOCK)):
                if count % CHECK_EVERY == 0:
                    processes.check_request()
                n = min(BLOCK, frames - start)
                if lib.fluid_synth_write_float(synth, n, at_left + 4 * start, 0, 1, at_right + 4 * start, 0, 1) != 0:
                    raise RuntimeError("FluidSynth failed while rendering")
            return np.stack([left, right], axis=1)
        finally:
            if player:
                lib.fluid_player_stop(player)
                lib.fluid_player_join(player)
                lib.delete_fluid_player(player)
            lib.delete_fluid_synth(synth)
            lib.delete_fluid_settings(settings)

    def close(self) -> None:
        with self.lock:
            if self._resident:
                self.lib.delete_fluid_synth(self._resident)
                self.lib.delete_fluid_settings(self._settings)
                self._resident = 0
