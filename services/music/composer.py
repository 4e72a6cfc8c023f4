"""The offline composer: rules from ``styles`` become MIDI, FluidSynth renders it.

Each span gets a whole number of beats: its tempo is the style's, nudged so the beats fill
the span exactly (its last bar is shorter where the beats do not divide into fours). So
every change of emotion falls on the new span's downbeat and the audio fits the timeline to
the sample. Each span is its own piece (``render_span``): it depends only on
its emotion, length, seed and controls, so a re-render of an edited timeline reuses every
span that did not change, sample for sample; it fades out over its last ``FADE_OUT_S``
and the next starts on its downbeat. The same seed gives the same MIDI and so the same audio.

A change of tempo glides: where a span meets another, its bar at that join ramps beat by
beat to (or from) ``PIVOT_BPM``, the tempo every join passes through, so the tempo runs on
across a join (joy's 120 slows to 100 and sadness takes it on from there to 72) while each
span still depends only on whether it has a neighbour, never on what the neighbour is.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
DRUM_KICK, DRUM_SNARE, DRUM_HAT, DRUM_RIDE, DRUM_CRASH = 36, 38, 42, 51, 49
DRUM_TOM_HIGH, DRUM_TOM_LOW = 48, 45
FADE_IN_S = 0.005  # no click at a span's first sample
FADE_OUT_S = 0.3  # the last notes' release, faded so the next span starts clean
PIVOT_BPM = 100.0  # the tempo at every join: the middle of the styles' 72-140
RAMP_BEATS = BEATS_PER_BAR  # a join's glide: the bar at it
RAMP_MIN_BEATS = 3 * BEATS_PER_BAR  # a shorter span keeps one tempo throughout


@dataclass(frozen=True)
class SpanPlan:
    emotion: str
    start_s: float
    end_s: float
    bars: int
    tempo: float  # the span's body: every beat but a join's glide
    variant: str = ""
    intensity: float | None = None
    beats: int = 0  # whole beats filling the span (0: ``bars`` of four)
    ramp_in: bool = False  # a span comes before: the first bar glides from PIVOT_BPM
    ramp_out: bool = False  # a span comes after: the last bar glides to PIVOT_BPM

    @property
    def beat_s(self) -> float:
        return 60.0 / self.tempo

    def beat_times(self) -> np.ndarray:
        """Seconds from the span's start to each beat (``beats`` + 1 of them, the last at its end)."""
        beats = self.beats or self.bars * BEATS_PER_BAR
        times = np.concatenate([[0.0], np.cumsum(60.0 / beat_tempos(beats, self.tempo, self.ramp_in,
                                                                     self.ramp_out))])
        if self.beats:  # exactly the span (the fit leaves ~1e-12 s)
            times *= (self.end_s - self.start_s) / times[-1]
        return times


def beat_tempos(beats: int, body: float, ramp_in: bool, ramp_out: bool) -> np.ndarray:
    """The tempo of each beat: ``body``, but gliding from PIVOT_BPM over the first bar
    (``ramp_in``) and to it over the last (``ramp_out``) where the span is long enough."""
    tempos = np.full(beats, body, dtype=np.float64)
    if beats >= RAMP_MIN_BEATS:
        glide = (np.arange(RAMP_BEATS) + 0.5) / RAMP_BEATS
        if ramp_in:
            tempos[:RAMP_BEATS] = PIVOT_BPM + (body - PIVOT_BPM) * glide
        if ramp_out:
            tempos[beats - RAMP_BEATS :] = body + (PIVOT_BPM - body) * glide
    return tempos


def _body_tempo(beats: int, seconds: float, ramp_in: bool, ramp_out: bool) -> float:
    """The body tempo at which ``beats`` beats, glides included, last ``seconds``."""
    if not (beats >= RAMP_MIN_BEATS and (ramp_in or ramp_out)):
        return beats * 60.0 / seconds
    lo, hi = 1.0, 2000.0  # a span's length falls as its body tempo rises: bisect
    for _ in range(80):
        mid = (lo + hi) / 2
        if float((60.0 / beat_tempos(beats, mid, ramp_in, ramp_out)).sum()) > seconds:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def plan(spans: Sequence[tuple[str, float, float]], tempo_override: float | None = None,
         joined: tuple[bool, bool] = (False, False)) -> list[SpanPlan]:
    """Whole beats per span, tempo nudged to fit (at most half a beat over the span, so a
    4.75 s sad span plays at 75.8 BPM, not the 50.5 that whole bars forced); the bars are
    the beats in fours, the last one shorter where they do not divide. A span shorter than a
    beat plays one beat's worth. Between spans, and before the first and after the last
    where ``joined`` says another span is there, the tempo glides through PIVOT_BPM (not
    with ``tempo_override``: one tempo throughout)."""
    plans = []
    for index, (emotion, start, end) in enumerate(spans):
        tempo = tempo_override or STYLES[emotion].tempo
        beats = max(1, round((end - start) * tempo / 60.0))
        ramp_in = tempo_override is None and (index > 0 or joined[0])
        ramp_out = tempo_override is None and (index < len(spans) - 1 or joined[1])
        if beats >= RAMP_MIN_BEATS and (ramp_in or ramp_out):  # as many beats as fit with the glides
            mean_beat_s = float((60.0 / beat_tempos(beats, tempo, ramp_in, ramp_out)).mean())
            beats = max(RAMP_MIN_BEATS, round((end - start) / mean_beat_s))
        fitted = _body_tempo(beats, end - start, ramp_in, ramp_out)
        plans.append(SpanPlan(emotion, start, end, -(-beats // BEATS_PER_BAR), fitted, beats=beats,
                              ramp_in=ramp_in, ramp_out=ramp_out))
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


PHRASE_BARS = 4
# Section B's comping: another texture over the same instruments.
B_COMPING = {"block": "arpeggio", "arpeggio": "pulse", "pulse": "block"}


def b_progression(style: Style) -> tuple[int, ...]:
    """Section B's chords: A's turned half-way round, ending on the dominant (a half cadence
    that leads back to A), so a bar never repeats the chord four bars before it."""
    turned = style.progression[2:] + style.progression[:2]
    return (*turned[:-1], 4)


def _voicing(triad: list[int], inversion: int) -> list[int]:
    """The triad inverted ``inversion`` times (lowest note up an octave each time)."""
    notes = sorted(triad)
    for _ in range(inversion % 3):
        notes = [*notes[1:], notes[0] + 12]
    return notes


@dataclass(frozen=True)
class BarRole:
    """Where a bar sits in the span's form."""

    section: str  # "intro", "A", "B" or "end"
    phrase: int  # which 4-bar phrase (0-based)
    fill: bool  # the last bar of a phrase that another follows: a drum fill leads on
    within: int = 0  # the bar's place in its phrase

    def degree(self, progressions: dict[str, tuple[int, ...]]) -> int:
        """The bar's chord: its section's progression, the tonic in the intro and the end."""
        chords = progressions.get(self.section)
        return chords[self.within % len(chords)] if chords else 0


def form(bars: int) -> list[BarRole]:
    """Phrases of four bars alternating A and B; a one-bar intro where the span has room
    (six bars or more); the last bar resolves."""
    roles = []
    intro = 1 if bars >= 6 else 0
    for bar in range(bars):
        if bar < intro:
            roles.append(BarRole("intro", 0, False))
            continue
        if bar == bars - 1 and bars > 1:
            roles.append(BarRole("end", (bar - intro) // PHRASE_BARS, False))
            continue
        phrase, within = divmod(bar - intro, PHRASE_BARS)
        roles.append(BarRole("A" if phrase % 2 == 0 else "B", phrase, within == PHRASE_BARS - 1 and bar < bars - 2,
                             within))
    return roles


def compose(plans: Sequence[SpanPlan], seed: int) -> object:
    """The MIDI score (a pretty_midi.PrettyMIDI) for the whole timeline: per span an intro
    bar, 4-bar phrases alternating sections A and B (B with other chords and another
    texture, each repeat of a section in another voicing), drum fills into each phrase, a
    bass that walks to the next chord, and a last bar on the tonic."""
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

    # Parts are written in beats from the span's start; ``note`` places them in seconds on
    # the span's beats (a join's glide makes them uneven).
    span = plans[0]
    times = span.beat_times()

    def seconds(beat: float) -> float:
        k = min(max(int(beat), 0), times.shape[0] - 2)
        return span.start_s + float(times[k] + (beat - k) * (times[k + 1] - times[k]))

    def note(inst: pretty_midi.Instrument, pitch: int, start: float, end: float, velocity: int) -> None:
        velocity = int(np.clip(velocity + rng.integers(-6, 7), 1, 127))  # drawn always: same seed, same music
        begin = seconds(start)
        if begin >= span.end_s - 1e-9:  # in a last bar the beats do not fill
            return
        inst.notes.append(pretty_midi.Note(velocity=velocity, pitch=int(pitch), start=begin,
                                           end=min(seconds(end), span.end_s)))

    for section, p in enumerate(plans):
        span, times = p, p.beat_times()
        style = vary(STYLES[p.emotion], p.variant, p.intensity)
        beat = 1.0
        chords, melody, bass = (track(program, section=section)
                                for program in (style.chord_program, style.melody_program, style.bass_program))
        drums = track(0, drum=True)
        previous = style.tonic + 12
        roles = form(p.bars)
        progressions = {"A": style.progression, "B": b_progression(style)}
        for bar, role in enumerate(roles):
            bar_start = bar * BEATS_PER_BAR * beat
            triad = _chord(style, role.degree(progressions))
            next_degree = roles[bar + 1].degree(progressions) if bar + 1 < len(roles) else 0
            # Louder in B, softer in the intro; each repeat of a section in another voicing.
            # The intro only a little softer: the span is levelled as a whole, so a quiet intro
            # would sit far under what came before the join (7.2 LU at joy -> sadness, 12 softer).
            lift = {"intro": -3, "A": 0, "B": 6, "end": -4}[role.section]
            voiced = _voicing(triad, role.phrase // 2)
            comping = B_COMPING[style.comping] if role.section == "B" else style.comping
            if role.section == "end":
                comping = "block"
            _comp(chords, comping, voiced, bar_start, beat, style.velocity + lift, note)
            _bass(bass, style, triad, _chord(style, next_degree)[0], bar_start, beat, role, style.velocity + lift,
                  note)
            if role.section != "intro":
                previous = _melody(melody, style, triad, previous, bar_start, beat, role, style.velocity + lift,
                                   rng, note)
            _drums(drums, style, bar_start, beat, note, role, 1.0 / p.beat_s)
    return pm


def _comp(chords: object, comping: str, triad: list[int], bar_start: float, beat: float, velocity: int,
          note: Callable[..., None]) -> None:
    if comping == "block":
        for pitch in triad:
            note(chords, pitch, bar_start, bar_start + BEATS_PER_BAR * beat * 0.98, velocity - 10)
    elif comping == "arpeggio":
        pattern = [*triad, triad[1], triad[2], triad[0] + 12, triad[2], triad[1]]
        for k in range(BEATS_PER_BAR * 2):
            t = bar_start + k * beat / 2
            note(chords, pattern[k % len(pattern)], t, t + beat / 2 * 0.95, velocity - 14)
    else:  # pulse
        for k in range(BEATS_PER_BAR * 2):
            t = bar_start + k * beat / 2
            for pitch in triad:
                note(chords, pitch, t, t + beat / 2 * 0.6, velocity - (8 if k % 2 == 0 else 20))


def _bass(bass: object, style: Style, triad: list[int], next_root: int, bar_start: float, beat: float,
          role: BarRole, velocity: int, note: Callable[..., None]) -> None:
    """Root on beat 1; in the intro and the last bar only that, held; otherwise the fifth on
    beat 3 and, in B, a step into the next chord's root on beat 4."""
    root = triad[0] - 24
    if role.section in ("intro", "end"):
        note(bass, root, bar_start, bar_start + BEATS_PER_BAR * beat * 0.95, velocity - 6)
        return
    note(bass, root, bar_start, bar_start + beat * 1.9, velocity - 6)
    fifth = triad[2] - 24
    if role.section == "B":
        note(bass, fifth, bar_start + 2 * beat, bar_start + 2.9 * beat, velocity - 8)
        target = next_root - 24
        approach = target - 1 if target > root else target + 2
        note(bass, approach, bar_start + 3 * beat, bar_start + 3.9 * beat, velocity - 10)
    else:
        note(bass, root if style.drums == "driving" else fifth, bar_start + 2 * beat, bar_start + 3.9 * beat,
             velocity - 6)


def _melody(melody: object, style: Style, triad: list[int], previous: int, bar_start: float, beat: float,
            role: BarRole, velocity: int, rng: np.random.Generator, note: Callable[..., None]) -> int:
    """Chord tones on strong beats, seeded scale steps between; busier in B; the last bar
    lands on the tonic and holds it."""
    scale = [style.tonic + 12 + o + 12 * octave for octave in (0, 1) for o in style.mode]
    if role.section == "end":
        tonic = min((n for n in scale if (n - style.tonic) % 12 == 0), key=lambda n: abs(n - previous))
        note(melody, tonic, bar_start, bar_start + BEATS_PER_BAR * beat * 0.95, velocity - 6)
        return tonic
    density = min(2.0, style.density * (1.5 if role.section == "B" else 1.0))
    steps = max(1, round(BEATS_PER_BAR * density))
    step_s = BEATS_PER_BAR * beat / steps
    for k in range(steps):
        t = bar_start + k * step_s
        if k == 0 or (k * step_s) % (2 * beat) < 1e-9:
            target = min((n + 12 for n in triad), key=lambda n: abs(n - previous))
        else:
            idx = min(range(len(scale)), key=lambda i: abs(scale[i] - previous))
            idx = int(np.clip(idx + rng.choice([-2, -1, -1, 1, 1, 2]), 0, len(scale) - 1))
            target = scale[idx]
        note(melody, target, t, t + step_s * 0.9, velocity)
        previous = target
    return previous


def _drums(drums: object, style: Style, bar_start: float, beat: float, note: Callable[..., None],
           role: BarRole, second: float) -> None:
    """The kit's bar; ``second``: a second in the units of ``beat`` (the hits' lengths)."""
    v = style.velocity
    if role.section == "intro":  # time kept on the cymbal alone
        for k in range(BEATS_PER_BAR * 2):
            t = bar_start + k * beat / 2
            note(drums, DRUM_RIDE if style.drums == "soft" else DRUM_HAT, t, t + 0.05 * second,
                 v - (20 if k % 2 == 0 else 32))
        return
    if role.section == "end":
        note(drums, DRUM_KICK, bar_start, bar_start + 0.1 * second, v - 10)
        note(drums, DRUM_CRASH, bar_start, bar_start + 0.5 * second, v - 20)
        return
    fill = role.fill
    beats = BEATS_PER_BAR - 1 if fill else BEATS_PER_BAR  # a fill takes the last beat
    if style.drums == "straight":
        for k in range(beats):
            t = bar_start + k * beat
            note(drums, DRUM_KICK if k % 2 == 0 else DRUM_SNARE, t, t + 0.1 * second, v)
        for k in range(beats * 2):
            t = bar_start + k * beat / 2
            note(drums, DRUM_HAT, t, t + 0.05 * second, v - 30)
    elif style.drums == "driving":
        for k in range(beats * 2):
            t = bar_start + k * beat / 2
            note(drums, DRUM_KICK, t, t + 0.1 * second, v)
            note(drums, DRUM_HAT, t, t + 0.05 * second, v - 25)
        for k in (1, 3):
            if k < beats:
                t = bar_start + k * beat
                note(drums, DRUM_SNARE, t, t + 0.1 * second, v)
    else:  # soft
        for k in range(beats):
            t = bar_start + k * beat
            note(drums, DRUM_KICK if k % 2 == 0 else DRUM_RIDE, t, t + 0.1 * second, v - 20)
    if fill:
        last = bar_start + (BEATS_PER_BAR - 1) * beat
        if style.drums == "soft":
            for k, tom in enumerate((DRUM_TOM_HIGH, DRUM_TOM_LOW)):
                note(drums, tom, last + k * beat / 2, last + k * beat / 2 + 0.1 * second, v - 24 + 6 * k)
        else:
            for k in range(4):
                t = last + k * beat / 4
                note(drums, DRUM_SNARE if k < 2 else (DRUM_TOM_HIGH if k == 2 else DRUM_TOM_LOW), t, t + 0.08,
                     v - 16 + 5 * k)


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
    version = "span-7"

    def __init__(self) -> None:
        synthesizer()  # fail at load, not at the first request

    def span_tempo(self, emotion: str, frames: int, sample_rate: int, tempo: float | None,
                   joined: tuple[bool, bool] = (False, False)) -> float:
        return plan([(emotion, 0.0, frames / sample_rate)], tempo, joined)[0].tempo

    def render_span(self, emotion: str, frames: int, *, sample_rate: int, seed: int, tempo: float | None,
                    variant: str = "", intensity: float | None = None,
                    joined: tuple[bool, bool] = (False, False)) -> np.ndarray:
        """One span's music, (frames, 2) float32, from its own content alone and whether a
        span comes before and after it (``joined``: the tempo glides there)."""
        base = plan([(emotion, 0.0, frames / sample_rate)], tempo, joined)[0]
        score = compose([replace(base, variant=variant, intensity=intensity)], seed)
        return fade_edges(render(score, sample_rate, frames), sample_rate)

    def generate(self, spans: Sequence[tuple[str, float, float]], *, sample_rate: int, seed: int,
                 tempo: float | None, cancel: threading.Event | None = None, steps: int | None = None,
                 guidance: float | None = None, strength: float | None = None) -> tuple[np.ndarray, float]:
        """The spans' music end to end, each span as ``render_span`` makes it (seeded by
        ``span_seed``). ``steps``, ``guidance`` and ``strength`` are for diffusion backends."""
        from services.music.backends import span_seed

        pieces = []
        last = len(spans) - 1
        for index, (emotion, start, end) in enumerate(spans):
            if cancel is not None and cancel.is_set():
                raise RuntimeError("cancelled")
            frames = round(end * sample_rate) - round(start * sample_rate)
            pieces.append(self.render_span(emotion, frames, sample_rate=sample_rate, seed=span_seed(seed, start),
                                           tempo=tempo, joined=(index > 0, index < last)))
        audio = np.concatenate(pieces)
        peak = float(np.abs(audio).max()) or 1.0
        audio *= min(1.0, 0.89 / peak)
        return audio, self.span_tempo(spans[0][0], round(spans[0][2] * sample_rate), sample_rate, tempo,
                                      (False, len(spans) > 1))
