"""Rebuilds the offline emotion model (services/emotion/model/goemotions-ekman7.npz).

Fits a linear classifier over word 1-2-grams and character 2-5-grams (tf-idf) and the
sentence vector of nade's fastText model (the features of ``services.emotion.linear``) on
the GoEmotions *train* split, mapped to our seven emotions, plus a copy of it with all
punctuation removed (transcripts may come without). The vectors (``--vector-weight 0``
leaves them out) were trained on far more text than GoEmotions: on the development split
they raise macro-F1 0.599 -> 0.612 and transcript-like 0.586 -> 0.604, and the repository's
own clear sentences 78 -> 79 of 84 (same settings otherwise; emoji probabilities from the
same model as well: 0.609, 77 of 84, so only the vectors are used).
The default is a blend of a linear SVM (squared hinge, C=0.1) and a logistic regression
(C=1), their logits each scaled to unit spread and mixed 0.7 : 0.3; a blend of two linear
models is one linear model, so the service runs it as before. On the development split,
tuned: SVM alone (C=0.05) 0.608 macro-F1, but it sent clear sentences of the repository's
own labelled set astray ("I am absolutely furious with them" -> joy: 73 of 84 right);
logistic regression alone 0.591 (78 of 84); the blend 0.601 and 78 of 84 (0.599 once
the biases are tuned under the service's neutral rule, as they now are).
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
from scipy.sparse import csr_matrix, hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, recall_score
from sklearn.svm import LinearSVC

from bgm import models, vocab
from services.emotion import linear
from services.emotion.settings import EmotionSettings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "realworld" / "emotion"
NEUTRAL_THRESHOLD = EmotionSettings().neutral_threshold


def read(path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    return [r["text"] for r in rows], np.array([vocab.EMOTIONS.index(r["label"]) for r in rows])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(logits: np.ndarray, temperature: float) -> np.ndarray:
    """What the service answers: the top class, or neutral where the top probability is under
    its default neutral threshold."""
    probs = softmax(logits / temperature)
    chosen = probs.argmax(1)
    chosen[probs.max(1) < NEUTRAL_THRESHOLD] = vocab.EMOTIONS.index(vocab.NEUTRAL)
    return chosen


def tune_bias(logits: np.ndarray, y: np.ndarray, min_recall: float, temperature: float = 1e-6,
              rounds: int = 3) -> np.ndarray:
    """Per-class offsets (coordinate ascent on a small grid) that raise macro-F1 of what the
    service would answer while every class keeps at least ``min_recall``: a rare emotion
    must not be traded away."""
    bias = np.zeros(logits.shape[1])
    best = f1_score(y, predict(logits, temperature), average="macro")
    for _ in range(rounds):
        for k in range(logits.shape[1]):
            for step in np.linspace(-0.5, 0.5, 11):
                trial = bias.copy()
                trial[k] += step
                predicted = predict(logits + trial, temperature)
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
    parser.add_argument("--model", choices=("blend", "svm", "logistic"), default="blend")
    parser.add_argument("--c", type=float, default=0.1, help="inverse regularisation strength of the SVM")
    parser.add_argument("--logistic-share", type=float, default=0.3, help="the logistic regression's part of a blend")
    parser.add_argument("--weight-power", type=float, default=0.75)
    parser.add_argument("--min-recall", type=float, default=0.45, help="per class, kept while tuning the biases")
    parser.add_argument("--vector-weight", type=float, default=1.0,
                        help="norm of the sentence-vector block beside the two tf-idf blocks (0: none)")
    args = parser.parse_args()

    texts, y = read(args.data / "goemotions_train_ekman7.csv")
    dev_texts, dev_y = read(args.data / "goemotions_dev_ekman7.csv")
    texts, y = texts + [linear.plain_text(t) for t in texts], np.concatenate([y, y])
    began = time.monotonic()
    words = TfidfVectorizer(analyzer=linear.word_features, min_df=2, sublinear_tf=True, dtype=np.float32)
    chars = TfidfVectorizer(analyzer=linear.char_features, min_df=3, sublinear_tf=True, dtype=np.float32)
    blocks = [words.fit_transform(texts), chars.fit_transform(texts)]
    dev_blocks = [words.transform(dev_texts), chars.transform(dev_texts)]
    vectors = None
    if args.vector_weight > 0:
        import fasttext

        model = fasttext.load_model(str(models.nade_word_vectors()))
        raw = linear.sentence_vectors(model, texts)
        vectors = (raw.mean(axis=0), raw.std(axis=0) + 1e-6)
        blocks.append(csr_matrix(args.vector_weight * linear.standardised(raw, *vectors)))
        dev_raw = linear.sentence_vectors(model, dev_texts)
        dev_blocks.append(csr_matrix(args.vector_weight * linear.standardised(dev_raw, *vectors)))
    x, dev_x = hstack(blocks).tocsr(), hstack(dev_blocks).tocsr()
    counts = np.bincount(y, minlength=len(vocab.EMOTIONS))
    weights = {k: (y.shape[0] / (len(counts) * c)) ** args.weight_power for k, c in enumerate(counts)}
    fitted = []
    if args.model in ("blend", "svm"):
        fitted.append((LinearSVC(C=args.c, class_weight=weights).fit(x, y),
                       1.0 - args.logistic_share if args.model == "blend" else 1.0))
    if args.model in ("blend", "logistic"):
        fitted.append((LogisticRegression(C=1.0 if args.model == "blend" else args.c, max_iter=3000,
                                          class_weight=weights).fit(x, y),
                       args.logistic_share if args.model == "blend" else 1.0))
    # Each model's logits scaled to unit spread on the development split, then mixed.
    coef = sum(share * m.coef_ / m.decision_function(dev_x).std() for m, share in fitted)
    intercept = sum(share * m.intercept_ / m.decision_function(dev_x).std() for m, share in fitted)
    print(f"fitted on {y.shape[0]} sentences, {x.shape[1]} features, in {time.monotonic() - began:.0f} s")

    logits = dev_x @ coef.T + intercept
    # Biases, then the temperature they imply, then biases again under the service's neutral
    # rule at that temperature (which it changes little), and the final temperature.
    temperature = fit_temperature(logits + tune_bias(logits, dev_y, args.min_recall), dev_y)
    bias = tune_bias(logits, dev_y, args.min_recall, temperature)
    temperature = fit_temperature(logits + bias, dev_y)
    print(f"development split: macro-F1 {f1_score(dev_y, predict(logits, temperature), average='macro'):.3f} -> "
          f"{f1_score(dev_y, predict(logits + bias, temperature), average='macro'):.3f} with biases "
          f"{np.round(bias, 2)}; temperature {temperature:.3f}")

    n_words, n_chars = len(words.vocabulary_), len(chars.vocabulary_)
    weights_by_feature = np.asarray(coef).T.astype(np.float32)  # (features, classes)
    extra = {}
    if vectors is not None:  # the block's weight folded into its weights
        extra = {"vector_mean": vectors[0], "vector_scale": vectors[1],
                 "vector_weights": args.vector_weight * weights_by_feature[n_words + n_chars:]}

    def terms(vectorizer: TfidfVectorizer) -> list[str]:
        return [t for t, _ in sorted(vectorizer.vocabulary_.items(), key=lambda item: item[1])]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, classes=np.array(vocab.EMOTIONS),
        word_terms=linear.pack_terms(terms(words)), word_idf=words.idf_.astype(np.float32),
        word_weights=weights_by_feature[:n_words],
        char_terms=linear.pack_terms(terms(chars)), char_idf=chars.idf_.astype(np.float32),
        char_weights=weights_by_feature[n_words:n_words + n_chars],
        bias=(intercept + bias).astype(np.float32), temperature=np.float32(temperature), **extra)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
