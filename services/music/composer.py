"""The offline composer: rules from ``styles`` become MIDI, FluidSynth renders it.

Each span gets a whole number of bars: its tempo is the style's, nudged so the bars fill
the span exactly. So every change of emotion falls on a bar line and the audio fits the
timeline to the sample. Each span is its own piece (``render_span``): it depends only on
its emotion, length, seed and controls, so a re-render of an edited timeline reuses every
span that did not change, sample for sample; it fades out over its last ``FADE_OUT_S``
and the next starts on its downbeat. The same seed gives the same MIDI and so the same audio.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bgm import logs, vocab
from bgm.errors import Unsupported
from services.music import midi as midi_file
from services.music.styles import STYLES, Style, vary
from services.music.synth import Synth

log = logs.get("bgm.music")

SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2")
BEATS_PER_BAR = 4
DRUM_KICK, DRUM_SNARE, DRUM_HAT, DRUM_RIDE = 36, 38, 42, 51
FADE_IN_S = 0.005  # no click at a span's first sample
FADE_OUT_S = 0.3  # the last notes' release, faded so the next span starts clean


@dataclass(frozen=True)
class SpanPlan:
    emotion: str
    start_s: float
    end_s: float
    bars: int
    tempo: float
    variant: str = ""
    intensity: float | None = None

    @property
    def beat_s(self) -> float:
        return 60.0 / self.tempo


def plan(spans: Sequence[tuple[str, float, float]], tempo_override: float | None = None) -> list[SpanPlan]:
    """Whole bars per span, tempo nudged to fit; a span shorter than a bar plays one bar's worth."""
    plans = []
    for emotion, start, end in spans:
        tempo = tempo_override or STYLES[emotion].tempo
        bar_s = BEATS_PER_BAR * 60.0 / tempo
        bars = max(1, round((end - start) / bar_s))
        fitted = bars * BEATS_PER_BAR * 60.0 / (end - start)
        plans.append(SpanPlan(emotion, start, end, bars, fitted))
    return plans


def soundfont() -> str:
    for path in (os.environ.get("BGM_MUSIC_SOUNDFONT", ""), *SOUNDFONTS):
        if path and Path(path).is_file():
            return path
    raise Unsupported("no General MIDI soundfont found (Debian: apt-get install fluid-soundfont-gm)")


def _chord(style: Style, degree: int) -> list[int]:
    """A triad on ``degree`` of the style's mode, as MIDI notes around the tonic."""
    mode = style.mode
    notes = []
    for step in (0, 2, 4):
        idx = degree + step
        notes.append(style.tonic + mode[idx % 7] + 12 * (idx // 7))
    return notes


def compose(plans: Sequence[SpanPlan], seed: int) -> object:
    """The MIDI score (a pretty_midi.PrettyMIDI) for the whole timeline."""
    import pretty_midi

    rng = np.random.default_rng(seed)
    pm = pretty_midi.PrettyMIDI(initial_tempo=plans[0].tempo)
    tracks: dict[tuple[int, bool, int], pretty_midi.Instrument] = {}

    def track(program: int, drum: bool = False, section: int = 0) -> pretty_midi.Instrument:
        # One instrument per section: each sounds only in its section, so sections share
        # MIDI channels in turn (services/music/midi.py) however many there are.
        key = (program, drum, section)
        if key not in tracks:
            tracks[key] = pretty_midi.Instrument(program=program, is_drum=drum)
            pm.instruments.append(tracks[key])
        return tracks[key]

    def note(inst: pretty_midi.Instrument, pitch: int, start: float, end: float, velocity: int) -> None:
        velocity = int(np.clip(velocity + rng.integers(-6, 7), 1, 127))
        inst.notes.append(pretty_midi.Note(velocity=velocity, pitch=int(pitch), start=start, end=end))

    for section, p in enumerate(plans):
        style = vary(STYLES[p.emotion], p.variant, p.intensity)
        beat = p.beat_s
        chords, melody, bass = (track(program, section=section)
                                for program in (style.chord_program, style.melody_program, style.bass_program))
        drums = track(0, drum=True)
        previous = style.tonic + 12
        for bar in range(p.bars):
            bar_start = p.start_s + bar * BEATS_PER_BAR * beat
            degree = style.progression[bar % len(style.progression)]
            triad = _chord(style, degree)
            last_bar = bar == p.bars - 1
            # Comping
            if style.comping == "block":
                for pitch in triad:
                    note(chords, pitch, bar_start, bar_start + BEATS_PER_BAR * beat * 0.98, style.velocity - 10)
            elif style.comping == "arpeggio":
                pattern = [*triad, triad[1] + 0, triad[2], triad[0] + 12, triad[2], triad[1]]
                for k in range(BEATS_PER_BAR * 2):
                    t = bar_start + k * beat / 2
                    note(chords, pattern[k % len(pattern)], t, t + beat / 2 * 0.95, style.velocity - 14)
            else:  # pulse
                for k in range(BEATS_PER_BAR * 2):
                    t = bar_start + k * beat / 2
                    for pitch in triad:
                        note(chords, pitch, t, t + beat / 2 * 0.6, style.velocity - (8 if k % 2 == 0 else 20))
            # Bass: root on beats 1 and 3
            root = triad[0] - 24
            for k in (0, 2):
                t = bar_start + k * beat
                note(bass, root, t, t + beat * 1.9, style.velocity - 6)
            # Melody: chord tones on strong beats, scale steps between, seeded
            steps = max(1, round(BEATS_PER_BAR * style.density))
            step_s = BEATS_PER_BAR * beat / steps
            scale = [style.tonic + 12 + o + 12 * octave for octave in (0, 1) for o in style.mode]
            for k in range(steps if not last_bar else max(1, steps // 2)):
                t = bar_start + k * step_s
                if k == 0 or (k * step_s) % (2 * beat) < 1e-9:
                    target = min((n + 12 for n in triad), key=lambda n: abs(n - previous))
                else:
                    idx = min(range(len(scale)), key=lambda i: abs(scale[i] - previous))
                    idx = int(np.clip(idx + rng.choice([-2, -1, -1, 1, 1, 2]), 0, len(scale) - 1))
                    target = scale[idx]
                length = step_s * (2.0 if last_bar else 0.9)
                note(melody, target, t, t + length, style.velocity)
                previous = target
            # Drums
            _drums(drums, style, bar_start, beat, note)
    return pm


def _drums(drums: object, style: Style, bar_start: float, beat: float, note: object) -> None:
    hit = note  # (instrument, pitch, start, end, velocity)
    v = style.velocity
    if style.drums == "straight":
        for k in range(BEATS_PER_BAR):
            t = bar_start + k * beat
            hit(drums, DRUM_KICK if k % 2 == 0 else DRUM_SNARE, t, t + 0.1, v)  # type: ignore[operator]
        for k in range(BEATS_PER_BAR * 2):
            t = bar_start + k * beat / 2
            hit(drums, DRUM_HAT, t, t + 0.05, v - 30)  # type: ignore[operator]
    elif style.drums == "driving":
        for k in range(BEATS_PER_BAR * 2):
            t = bar_start + k * beat / 2
            hit(drums, DRUM_KICK, t, t + 0.1, v)  # type: ignore[operator]
            hit(drums, DRUM_HAT, t, t + 0.05, v - 25)  # type: ignore[operator]
        for k in (1, 3):
            t = bar_start + k * beat
            hit(drums, DRUM_SNARE, t, t + 0.1, v)  # type: ignore[operator]
    else:  # soft
        for k in range(BEATS_PER_BAR):
            t = bar_start + k * beat
            hit(drums, DRUM_KICK if k % 2 == 0 else DRUM_RIDE, t, t + 0.1, v - 20)  # type: ignore[operator]


@functools.cache
def synthesizer() -> Synth:
    """The process's FluidSynth, with the soundfont loaded once."""
    return Synth(soundfont())


def render(pm: object, sample_rate: int, total_samples: int) -> np.ndarray:
    """Render a score with FluidSynth to float32 stereo of exactly ``total_samples`` frames."""
    midi = io.BytesIO()
    midi_file.write(pm, midi)
    return synthesizer().render(midi.getvalue(), total_samples, sample_rate)


def fade_edges(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A span's own edges: a few milliseconds in, ``FADE_OUT_S`` out (in place)."""
    n = audio.shape[0]
    fade_in = min(n // 4, int(FADE_IN_S * sample_rate))
    fade_out = min(n // 4, int(FADE_OUT_S * sample_rate))
    if fade_in:
        audio[:fade_in] *= np.linspace(0.0, 1.0, fade_in, dtype=np.float32)[:, None]
    if fade_out:
        audio[n - fade_out:] *= np.linspace(1.0, 0.0, fade_out, dtype=np.float32)[:, None]
    return audio


class ComposerBackend:
    name = vocab.MUSIC_COMPOSER
    # Bump when a change alters what a span sounds like: cached renders are keyed by it.
    version = "span-2"

    def __init__(self) -> None:
        synthesizer()  # fail at load, not at the first request

    def span_tempo(self, emotion: str, frames: int, sample_rate: int, tempo: float | None) -> float:
        return plan([(emotion, 0.0, frames / sample_rate)], tempo)[0].tempo

    def render_span(self, emotion: str, frames: int, *, sample_rate: int, seed: int, tempo: float | None,
                    variant: str = "", intensity: float | None = None) -> np.ndarray:
        """One span's music, (frames, 2) float32, from its own content alone."""
        base = plan([(emotion, 0.0, frames / sample_rate)], tempo)[0]
        score = compose([SpanPlan(emotion, 0.0, base.end_s, base.bars, base.tempo, variant, intensity)], seed)
        return fade_edges(render(score, sample_rate, frames), sample_rate)

    def generate(self, spans: Sequence[tuple[str, float, float]], *, sample_rate: int, seed: int,
                 tempo: float | None, cancel: threading.Event | None = None, steps: int | None = None,
                 guidance: float | None = None, strength: float | None = None) -> tuple[np.ndarray, float]:
        """The spans' music end to end, each span as ``render_span`` makes it (seeded by
        ``span_seed``). ``steps``, ``guidance`` and ``strength`` are for diffusion backends."""
        from services.music.backends import span_seed

        pieces = []
        for emotion, start, end in spans:
            if cancel is not None and cancel.is_set():
                raise RuntimeError("cancelled")
            frames = round(end * sample_rate) - round(start * sample_rate)
            pieces.append(self.render_span(emotion, frames, sample_rate=sample_rate,
                                           seed=span_seed(seed, start), tempo=tempo))
        audio = np.concatenate(pieces)
        peak = float(np.abs(audio).max()) or 1.0
        audio *= min(1.0, 0.89 / peak)
        return audio, self.span_tempo(spans[0][0], round(spans[0][2] * sample_rate), sample_rate, tempo)
