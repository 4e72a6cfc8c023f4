"""Writing the composer's score as a Standard MIDI File with channels that never clash.

MIDI has 16 channels, one program each at a time, and channel 10 is the drum kit.
pretty_midi's writer gives every instrument its own channel in turn and one program change
at time 0, so with more than 15 instruments (a timeline with every emotion has 21) two
instruments share a channel and one of them plays with the other's sound for the whole
piece. Here instruments that do not sound at the same time share a channel, each with its
program change where it starts, so any number of sections fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

DRUM_CHANNEL = 9  # "channel 10" as people count them
MELODIC_CHANNELS = tuple(c for c in range(16) if c != DRUM_CHANNEL)


class TooManyVoices(ValueError):
    """More instruments sound at one moment than MIDI has channels."""


@dataclass(frozen=True)
class Placement:
    instrument: Any  # a pretty_midi.Instrument
    channel: int
    start_s: float
    end_s: float


def allocate(instruments: list[Any]) -> list[Placement]:
    """A channel for every instrument with notes: drums on channel 10, the others on the
    channel free longest by their first note (interval colouring: as many channels as
    instruments sound at once). Taking the longest-free channel keeps a new instrument off
    channels whose last notes are still ringing out: FluidSynth cuts a voice when the same
    key starts again on its channel. Up to 15 instruments each get a channel of their own."""
    placed: list[Placement] = []
    free_from = dict.fromkeys(MELODIC_CHANNELS, float("-inf"))
    timed = [(min(n.start for n in i.notes), max(n.end for n in i.notes), i) for i in instruments if i.notes]
    for start, end, instrument in sorted(timed, key=lambda item: (item[0], item[1])):
        if instrument.is_drum:
            placed.append(Placement(instrument, DRUM_CHANNEL, start, end))
            continue
        channel = min((c for c in MELODIC_CHANNELS if free_from[c] <= start),
                      key=lambda c: (free_from[c], c), default=None)
        if channel is None:
            raise TooManyVoices(f"more than {len(MELODIC_CHANNELS)} instruments sound at {start:.2f} s")
        free_from[channel] = end
        placed.append(Placement(instrument, channel, start, end))
    return placed


def write(score: Any, path: Path | BinaryIO) -> list[Placement]:
    """Write ``score`` (a pretty_midi.PrettyMIDI) to ``path`` (or a binary file object);
    returns where each instrument went.

    Where every instrument can have a channel of its own, pretty_midi's writer does that
    (and the audio stays exactly what it was: FluidSynth renders the same notes on other
    channels measurably differently); only larger scores share channels in turn."""
    import mido

    melodic = [i for i in score.instruments if not i.is_drum]
    if len(melodic) <= len(MELODIC_CHANNELS):
        score.write(path if not isinstance(path, Path) else str(path))
        # pretty_midi's own rule: the n-th instrument on the n-th channel, drums on 10.
        return [Placement(i, DRUM_CHANNEL if i.is_drum else MELODIC_CHANNELS[n % len(MELODIC_CHANNELS)],
                          min(x.start for x in i.notes), max(x.end for x in i.notes))
                for n, i in enumerate(score.instruments) if i.notes]
    placements = allocate(score.instruments)
    midi = mido.MidiFile(type=1, ticks_per_beat=score.resolution)
    conductor = mido.MidiTrack()
    times, tempi = score.get_tempo_changes()
    for time_s, bpm in zip(times, tempi, strict=True):
        conductor.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm), time=score.time_to_tick(time_s)))
    midi.tracks.append(_relative(conductor))
    for placement in placements:
        instrument, channel = placement.instrument, placement.channel
        # (tick, order, message): at one tick, the program change first, then note-offs, then note-ons.
        events: list[tuple[int, int, mido.Message]] = []
        if not instrument.is_drum:
            events.append((score.time_to_tick(placement.start_s), 0,
                           mido.Message("program_change", channel=channel, program=instrument.program)))
        for note in instrument.notes:
            events.append((score.time_to_tick(note.start), 2, mido.Message(
                "note_on", channel=channel, note=note.pitch, velocity=note.velocity)))
            events.append((score.time_to_tick(note.end), 1, mido.Message(
                "note_off", channel=channel, note=note.pitch, velocity=0)))
        track = mido.MidiTrack()
        for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
            track.append(message.copy(time=tick))
        midi.tracks.append(_relative(track))
    if isinstance(path, Path):
        midi.save(str(path))
    else:
        midi.save(file=path)
    return placements


def _relative(track: Any) -> Any:
    """Absolute ticks (as built) to the delta times a MIDI file stores."""
    import mido

    out = mido.MidiTrack()
    previous = 0
    for message in track:
        out.append(message.copy(time=message.time - previous))
        previous = message.time
    out.append(mido.MetaMessage("end_of_track", time=0))
    return out
