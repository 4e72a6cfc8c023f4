"""Rebuilds the offline emotion model (services/emotion/model/goemotions-ekman7.npz).

Fits a logistic regression over word 1-2-grams and character 2-5-grams (tf-idf, the
features of ``services.emotion.linear``) on the GoEmotions *train* split, mapped to our seven
emotions, plus a copy of it with all punctuation removed (transcripts may come without).
Rare classes weigh more (inverse frequency to the power ``--weight-power``). On the
*development* split only: per-class biases that raise macro-F1, then a temperature that
calibrates the probabilities. No other data is used.

    python tools/train_emotion.py [--data ../shared/realworld/emotion] [--out services/emotion/model/...]

Needs scikit-learn (in the dev extra); the service itself runs on numpy alone.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, recall_score

from bgm import vocab
from services.emotion import linear

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "realworld" / "emotion"


def read(path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    return [r["text"] for r in rows], np.array([vocab.EMOTIONS.index(r["label"]) for r in rows])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def tune_bias(logits: np.ndarray, y: np.ndarray, min_recall: float, rounds: int = 3) -> np.ndarray:
    """Per-class offsets (coordinate ascent on a small grid) that raise macro-F1 while every
    class keeps at least ``min_recall``: a rare emotion must not be traded away."""
    bias = np.zeros(logits.shape[1])
    best = f1_score(y, logits.argmax(1), average="macro")
    for _ in range(rounds):
        for k in range(logits.shape[1]):
            for step in np.linspace(-0.5, 0.5, 11):
                trial = bias.copy()
                trial[k] += step
                predicted = (logits + trial).argmax(1)
                if recall_score(y, predicted, average=None).min() < min_recall:
                    continue
                score = f1_score(y, predicted, average="macro")
                if score > best + 1e-4:
                    best, bias = score, trial
    return bias


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    def nll(t: float) -> float:
        p = softmax(logits / t)
        return float(-np.log(p[np.arange(y.shape[0]), y] + 1e-12).mean())

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=linear.MODEL_FILE)
    parser.add_argument("--c", type=float, default=1.0, help="inverse regularisation strength")
    parser.add_argument("--weight-power", type=float, default=0.75)
    parser.add_argument("--min-recall", type=float, default=0.5, help="per class, kept while tuning the biases")
    args = parser.parse_args()

    texts, y = read(args.data / "goemotions_train_ekman7.csv")
    dev_texts, dev_y = read(args.data / "goemotions_dev_ekman7.csv")
    texts, y = texts + [linear.plain_text(t) for t in texts], np.concatenate([y, y])
    began = time.monotonic()
    words = TfidfVectorizer(analyzer=linear.word_features, min_df=2, sublinear_tf=True, dtype=np.float32)
    chars = TfidfVectorizer(analyzer=linear.char_features, min_df=3, sublinear_tf=True, dtype=np.float32)
    from scipy.sparse import hstack

    x = hstack([words.fit_transform(texts), chars.fit_transform(texts)]).tocsr()
    counts = np.bincount(y, minlength=len(vocab.EMOTIONS))
    weights = {k: (y.shape[0] / (len(counts) * c)) ** args.weight_power for k, c in enumerate(counts)}
    model = LogisticRegression(C=args.c, max_iter=3000, class_weight=weights).fit(x, y)
    print(f"fitted on {y.shape[0]} sentences, {x.shape[1]} features, in {time.monotonic() - began:.0f} s")

    dev_x = hstack([words.transform(dev_texts), chars.transform(dev_texts)]).tocsr()
    logits = model.decision_function(dev_x)
    bias = tune_bias(logits, dev_y, args.min_recall)
    temperature = fit_temperature(logits + bias, dev_y)
    print(f"development split: macro-F1 {f1_score(dev_y, logits.argmax(1), average='macro'):.3f} -> "
          f"{f1_score(dev_y, (logits + bias).argmax(1), average='macro'):.3f} with biases {np.round(bias, 2)}; "
          f"temperature {temperature:.3f}")

    n_words = len(words.vocabulary_)
    coef = model.coef_.T.astype(np.float32)  # (features, classes)

    def terms(vectorizer: TfidfVectorizer) -> list[str]:
        return [t for t, _ in sorted(vectorizer.vocabulary_.items(), key=lambda item: item[1])]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, classes=np.array(vocab.EMOTIONS),
        word_terms=linear.pack_terms(terms(words)), word_idf=words.idf_.astype(np.float32),
        word_weights=coef[:n_words].astype(np.float16),
        char_terms=linear.pack_terms(terms(chars)), char_idf=chars.idf_.astype(np.float32),
        char_weights=coef[n_words:].astype(np.float16),
        bias=(model.intercept_ + bias).astype(np.float32), temperature=np.float32(temperature))
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
