"""Musical rules per emotion: an editable table the composer follows.

Tempos are in BPM, 4/4 time. Chords are scale degrees (0 = tonic) of the mode; programs
are General MIDI instruments (0-based). ``density`` is melody notes per beat.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bgm import vocab

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)


@dataclass(frozen=True)
class Style:
    tempo: float
    mode: tuple[int, ...]
    # Tonic as a MIDI note number (60 = middle C).
    tonic: int
    progression: tuple[int, ...]
    chord_program: int
    melody_program: int
    bass_program: int
    velocity: int
    density: float
    # "straight" (kick/snare/hats), "soft" (kick and brush-like hats), "driving" (eighth kicks)
    drums: str
    # How the chord instrument plays: "block", "arpeggio" or "pulse" (repeated eighths).
    comping: str


# The keys sit within two steps of each other on the circle of fifths (C, F and G major;
# their relative minors A, D and E), so a change of emotion always moves to a related key:
# neutral was D major and disgust F minor, six steps apart (bench.musicality reports it).
# Neutral's G sits above its old D, not under it: a G a fifth lower put its melody into the
# voice's range, and Whisper heard JFK's "so my" as "so am I" (bench.quality).
STYLES: dict[str, Style] = {
    vocab.JOY: Style(120, MAJOR, 60, (0, 4, 5, 3), 0, 73, 33, 96, 1.0, "straight", "arpeggio"),
    vocab.SADNESS: Style(72, MINOR, 57, (0, 5, 2, 6), 48, 0, 32, 64, 0.5, "soft", "block"),
    vocab.ANGER: Style(140, MINOR, 52, (0, 0, 5, 6), 30, 29, 34, 112, 1.0, "driving", "pulse"),
    vocab.FEAR: Style(84, MINOR, 50, (0, 1, 0, 6), 44, 41, 43, 70, 0.5, "soft", "pulse"),
    vocab.SURPRISE: Style(132, MAJOR, 65, (0, 1, 4, 5), 45, 9, 33, 92, 1.0, "straight", "arpeggio"),
    vocab.DISGUST: Style(92, MINOR, 52, (0, 1, 3, 1), 70, 68, 38, 80, 0.5, "soft", "pulse"),
    vocab.NEUTRAL: Style(100, MAJOR, 67, (0, 5, 3, 4), 4, 11, 33, 76, 0.5, "soft", "arpeggio"),
}

# A creator's variations on an emotion's music (SpanControl.style): other instruments, the
# emotion's harmony, tempo and rhythm kept. (chord, melody, bass programs; drums pattern)
VARIANTS: dict[str, tuple[int, int, int, str | None]] = {
    "piano": (0, 0, 32, None),
    "strings": (48, 40, 42, "soft"),
    "band": (25, 26, 33, "straight"),
    "ambient": (89, 88, 38, "soft"),
    # Strings under a horn lead, cello bass, soft kit.
    "cinematic": (48, 60, 42, "soft"),
    # Steel-string guitar, flute, acoustic bass, brushes.
    "acoustic": (25, 73, 32, "soft"),
    # Poly-synth pad, square lead, synth bass, driving kick.
    "electronic": (90, 80, 38, "driving"),
    # Electric piano, vibraphone, finger bass, laid-back kit.
    "lo-fi": (4, 11, 33, "soft"),
    # Strings, oboe, contrabass; the emotion's own drums.
    "orchestral": (48, 68, 43, None),
}


def vary(style: Style, variant: str = "", intensity: float | None = None) -> Style:
    """``style`` in a named variant, at an intensity (0..1; None keeps the emotion's own).

    Intensity scales how much is played (melody density, velocity) and, below 0.25, drops
    the drums to their softest pattern; the level offset is the levelling's (``levels``).
    """
    if variant:
        chord, melody, bass, drums = VARIANTS[variant]
        style = replace(style, chord_program=chord, melody_program=melody, bass_program=bass,
                        drums=drums or style.drums)
    if intensity is not None:
        scale = 0.5 + intensity  # 0.5x .. 1.5x
        style = replace(style, density=max(0.25, min(2.0, style.density * scale)),
                        velocity=int(max(30, min(127, style.velocity * (0.75 + 0.5 * intensity)))),
                        drums="soft" if intensity < 0.25 else style.drums)
    return style


# Riffusion prompts per emotion: what the diffusion model is asked for. Edit freely.
PROMPTS: dict[str, str] = {
    vocab.JOY: "upbeat happy acoustic pop, bright piano and ukulele, cheerful",
    vocab.SADNESS: "slow sad piano ballad with soft strings, melancholic",
    vocab.ANGER: "aggressive heavy rock, distorted guitars and pounding drums",
    vocab.FEAR: "dark suspenseful cinematic drones, tense low strings",
    vocab.SURPRISE: "playful quirky orchestral pizzicato, sudden bright accents",
    vocab.DISGUST: "dissonant murky experimental synth, uneasy",
    vocab.NEUTRAL: "calm ambient lo-fi background, soft electric piano",
}
