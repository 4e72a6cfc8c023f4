"""Is it a loop? Bar-by-bar repetition of rendered music, on the bar grid the composer used.

Each bar is described by its mean chroma and mean MFCC (librosa, beat-synchronous since the
bars are whole beats); a bar is *near-identical* to the bar four bars earlier when the two
descriptions have a cosine similarity above 0.995. A literal 4-bar loop scores 1.0.

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
    for emotion in STYLES:
        shares = []
        for seed in args.seeds:
            audio, tempo = composer.generate([(emotion, 0.0, args.seconds)], sample_rate=rate, seed=seed, tempo=None)
            shares.append(repeated_fraction(audio.mean(axis=1), rate, BEATS_PER_BAR * 60.0 / tempo))
        print(f"{emotion:10s} " + " ".join(f"{s:8.2f}" for s in shares))


if __name__ == "__main__":
    main()
