"""Music a listener can tell apart and would not call a loop, measured on composer renders.

- Loop: each bar is described by its mean chroma and mean MFCC (librosa, on the bar grid the
  composer used); a bar is *near-identical* to the bar four bars earlier when the two have a
  cosine similarity above 0.995. A literal 4-bar loop scores 1.0.
- Emotions apart: per render [tempo (beat tracker), mode (Krumhansl-Schmuckler major minus
  minor correlation), loudness (LUFS), onset density, spectral centroid]; a nearest-centroid
  classifier, leave-one-seed-out (standardised on the other seeds), names the emotion.
- Per emotion: tempo, mode and loudness, and the loudness spread across emotions.

    python -m bench.musicality [--seconds 24] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse

import numpy as np

NEAR_IDENTICAL = 0.995
LAG_BARS = 4


def bar_features(mono: np.ndarray, sample_rate: int, bar_s: float) -> np.ndarray:
    """(bars, features): mean chroma and mean MFCC per whole bar (standardised per feature
    kind, so neither dominates the cosine)."""
    import librosa

    hop = 512
    chroma = librosa.feature.chroma_stft(y=mono, sr=sample_rate, hop_length=hop)
    mfcc = librosa.feature.mfcc(y=mono, sr=sample_rate, hop_length=hop, n_mfcc=20)[1:]  # no energy term
    bars = int(mono.shape[0] / sample_rate / bar_s + 1e-6)
    rows = []
    for b in range(bars):
        lo, hi = (round(x * bar_s * sample_rate / hop) for x in (b, b + 1))
        c, m = chroma[:, lo:hi].mean(axis=1), mfcc[:, lo:hi].mean(axis=1)
        rows.append(np.concatenate([c / (np.linalg.norm(c) + 1e-9), m / (np.linalg.norm(m) + 1e-9)]))
    return np.asarray(rows)


def repeated_fraction(mono: np.ndarray, sample_rate: int, bar_s: float, lag: int = LAG_BARS) -> float:
    """The share of bars near-identical to the bar ``lag`` bars earlier (NaN under lag+1 bars)."""
    features = bar_features(mono, sample_rate, bar_s)
    if features.shape[0] <= lag:
        return float("nan")
    a, b = features[lag:], features[:-lag]
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float((cosine > NEAR_IDENTICAL).mean())


MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
FEATURES = ("tempo", "mode", "loudness", "onsets/s", "centroid")


def key_correlations(chroma: np.ndarray) -> list[tuple[float, int, bool]]:
    """Krumhansl-Schmuckler: (correlation, tonic pitch class, major?) for all 24 keys."""
    return [(float(np.corrcoef(np.roll(profile, k), chroma)[0, 1]), k, major)
            for profile, major in ((MAJOR_PROFILE, True), (MINOR_PROFILE, False)) for k in range(12)]


def mode_score(mono: np.ndarray, sample_rate: int) -> float:
    """Best major-key correlation minus best minor-key correlation (> 0: sounds major)."""
    import librosa

    keys = key_correlations(librosa.feature.chroma_stft(y=mono, sr=sample_rate).mean(axis=1))
    return max(c for c, _, major in keys if major) - max(c for c, _, major in keys if not major)


def estimate_key(mono: np.ndarray, sample_rate: int) -> tuple[int, bool]:
    """The best-correlated key on constant-Q chroma: (tonic pitch class, major?)."""
    import librosa

    _, tonic, major = max(key_correlations(librosa.feature.chroma_cqt(y=mono, sr=sample_rate).mean(axis=1)))
    return tonic, major


def fifths_apart(a: tuple[int, bool], b: tuple[int, bool]) -> int:
    """Steps between two keys' signatures on the circle of fifths (a key and its relative
    minor are 0 apart; C major and D major 2; D major and F minor 6, the most there is)."""
    def position(key: tuple[int, bool]) -> int:
        tonic, major = key
        return ((tonic if major else tonic + 3) * 7) % 12

    step = abs(position(a) - position(b))
    return min(step, 12 - step)


def key_name(key: tuple[int, bool]) -> str:
    return f"{PITCH_NAMES[key[0]]} {'major' if key[1] else 'minor'}"


PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def describe(stereo: np.ndarray, sample_rate: int) -> np.ndarray:
    """[tempo, mode, loudness, onset density, spectral centroid] of one render."""
    import librosa

    from bgm.loudness import loudness

    mono = stereo.mean(axis=1)
    tempo = float(np.atleast_1d(librosa.beat.beat_track(y=mono, sr=sample_rate)[0])[0])
    onsets = librosa.onset.onset_detect(y=mono, sr=sample_rate, units="time")
    centroid = float(librosa.feature.spectral_centroid(y=mono, sr=sample_rate).mean())
    return np.array([tempo, mode_score(mono, sample_rate), loudness(stereo, sample_rate),
                     len(onsets) / (mono.shape[0] / sample_rate), centroid])


def leave_one_seed_out(features: dict[tuple[str, int], np.ndarray]) -> float:
    """Share of renders a nearest-centroid classifier names right, each seed held out in turn."""
    emotions = sorted({e for e, _ in features})
    seeds = sorted({s for _, s in features})
    right = total = 0
    for held in seeds:
        train = {k: v for k, v in features.items() if k[1] != held}
        stack = np.array(list(train.values()))
        mean, std = stack.mean(axis=0), stack.std(axis=0) + 1e-9
        centroids = {e: np.mean([(v - mean) / std for k, v in train.items() if k[0] == e], axis=0)
                     for e in emotions}
        for e in emotions:
            x = (features[(e, held)] - mean) / std
            guess = min(emotions, key=lambda c: float(np.sum((x - centroids[c]) ** 2)))
            right += guess == e
            total += 1
    return right / total


JOIN_TIMELINE = [("joy", 0.0, 25.0), ("sadness", 25.0, 47.0), ("anger", 47.0, 70.0)]


def transitions(rate: int = 22_050, seed: int = 1) -> list[tuple[float, float, float]]:
    """A 70 s joy -> sadness -> anger timeline as the music service hands it out (each span
    rendered alone and levelled, ``levels.level_span``): per join, the short-term loudness
    (3 s) after minus before it (LU), and the largest sample jump within 10 ms of the join
    over the track's 99.9th-percentile jump."""
    from bgm.loudness import loudness
    from services.music.backends import span_seed
    from services.music.composer import ComposerBackend
    from services.music.levels import level_span

    spans = JOIN_TIMELINE
    composer = ComposerBackend()
    pieces = []
    for index, (emotion, start, end) in enumerate(spans):
        frames = round(end * rate) - round(start * rate)
        piece = composer.render_span(emotion, frames, sample_rate=rate, seed=span_seed(seed, start), tempo=None,
                                     joined=(index > 0, index < len(spans) - 1))
        pieces.append(level_span(piece, emotion, rate))
    music = np.concatenate(pieces)
    jumps = np.abs(np.diff(music.mean(axis=1)))
    typical = float(np.percentile(jumps, 99.9))
    out = []
    for _, start, _ in spans[1:]:
        join = round(start * rate)
        before = loudness(music[join - 3 * rate : join], rate)
        after = loudness(music[join : join + 3 * rate], rate)
        near = jumps[join - rate // 100 : join + rate // 100]
        out.append((start, after - before, float(near.max()) / typical))
    return out


def main() -> None:
    from services.music.composer import BEATS_PER_BAR, ComposerBackend
    from services.music.styles import STYLES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=24.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    composer, rate = ComposerBackend(), 22_050
    print(f"{'emotion':10s} " + " ".join(f"seed {s:>3d}" for s in args.seeds) + "   (share of bars near-identical "
          f"to the bar {LAG_BARS} earlier; at most 0.5 wanted)")
    features: dict[tuple[str, int], np.ndarray] = {}
    keys: dict[str, list[tuple[int, bool]]] = {}
    for emotion in STYLES:
        shares = []
        for seed in args.seeds:
            audio, tempo = composer.generate([(emotion, 0.0, args.seconds)], sample_rate=rate, seed=seed, tempo=None)
            shares.append(repeated_fraction(audio.mean(axis=1), rate, BEATS_PER_BAR * 60.0 / tempo))
            features[(emotion, seed)] = describe(audio, rate)
            keys.setdefault(emotion, []).append(estimate_key(audio.mean(axis=1), rate))
        print(f"{emotion:10s} " + " ".join(f"{s:8.2f}" for s in shares))
    print(f"\n{'emotion':10s} " + " ".join(f"{f:>9s}" for f in FEATURES) + "   (means over seeds)")
    means = {}
    for emotion in STYLES:
        means[emotion] = np.mean([features[(emotion, s)] for s in args.seeds], axis=0)
        print(f"{emotion:10s} " + " ".join(f"{v:9.2f}" for v in means[emotion]))
    from bgm.loudness import loudness
    from services.music.levels import level_span

    raw = [m[2] for m in means.values()]
    served = [np.mean([loudness(level_span(composer.generate([(e, 0.0, args.seconds)], sample_rate=rate,
                                                               seed=s, tempo=None)[0], e, rate), rate)
                       for s in args.seeds]) for e in STYLES]
    print(f"\nloudness spread across emotions: {max(served) - min(served):.1f} LU as the music service hands "
          f"the spans out (levelled, at most 6 wanted); {max(raw) - min(raw):.1f} LU as the composer renders them")
    print(f"emotions told apart (nearest centroid, leave one seed out): {leave_one_seed_out(features):.0%} "
          "(at least 85 % wanted)")
    print("\nkey found per emotion (each seed): " + "; ".join(
        f"{e} {', '.join(sorted({key_name(k) for k in found}))}" for e, found in keys.items()))
    found = [k for ks in keys.values() for k in ks]
    apart = max(fifths_apart(a, b) for a in found for b in found)
    print(f"keys at most {apart} steps apart on the circle of fifths, over every pair of renders "
          "(a change of emotion moves to a related key: at most 2 wanted; relative keys are 0 apart)")
    for at, step, click in transitions(rate):
        print(f"join at {at:4.0f} s: short-term loudness {step:+.1f} LU across it (within 4 wanted), largest jump "
              f"{click:.2f}x the 99.9th percentile (at most 2 wanted)")
    for at, tempos, change in tempo_glides():
        print(f"join at {at:4.0f} s: beats at {' '.join(f'{t:.0f}' for t in tempos)} BPM across it (as the composer "
              f"writes them); largest change from one beat to the next {change:.1%}")


def tempo_glides() -> list[tuple[float, list[float], float]]:
    """The same timeline's beats around each join: the four before and after (BPM), and the
    largest change in beat length from one beat to the next anywhere in it."""
    from services.music.composer import plan

    plans = plan(JOIN_TIMELINE)
    lengths = np.concatenate([np.diff(p.beat_times()) for p in plans])
    change = float(np.abs(lengths[1:] / lengths[:-1] - 1).max())
    out, first = [], 0
    for p in plans[:-1]:
        first += p.beats
        out.append((p.end_s, [60.0 / b for b in lengths[first - 4 : first + 4]], change))
    return out


if __name__ == "__main__":
    main()
