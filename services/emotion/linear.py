"""The offline default: a linear classifier over word and character n-grams, trained on the
GoEmotions train split (Ekman's grouping into our seven emotions) and calibrated on its
development split. Plain numpy at run time; ``tools/train_emotion.py`` rebuilds the model
file from the CSVs (scikit-learn fits it).

Text is read as a transcript: lower-cased, punctuation dropped except ``!`` and ``?`` (which
carry surprise and anger); the model was also trained on a copy of its data with no
punctuation at all, so Whisper output with or without it reads the same.

The features follow scikit-learn's ``TfidfVectorizer`` exactly (word 1-2-grams, and
character 2-5-grams inside word boundaries, each block with sublinear tf, idf and its own
L2 norm), so the fitted weights apply unchanged. A third block is the sentence vector of
nade's fastText model (90 numbers; trained on a large social-media corpus to predict emoji),
standardised and L2-normalised: GoEmotions has "furious" 7 times, the vectors place it
near "angry", so the model reads words its training text seldom uses.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bgm import vocab

MODEL_FILE = Path(__file__).with_name("model") / "goemotions-ekman7.npz"
_KEEP = re.compile(r"[^\w\s'!?]+")
_PLAIN = re.compile(r"[^\w\s']+")
_TOKEN = re.compile(r"[\w']+|[!?]")
WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 5)


def words_text(text: str) -> str:
    """Lower case, punctuation out except ``!``/``?`` (each its own token)."""
    spaced = _KEEP.sub(" ", text.lower()).replace("!", " ! ").replace("?", " ? ")
    return " ".join(spaced.split())


def plain_text(text: str) -> str:
    """Lower case, all punctuation out: how a transcript may come."""
    return " ".join(_PLAIN.sub(" ", text.lower()).split())


def word_features(text: str) -> list[str]:
    tokens = _TOKEN.findall(words_text(text))
    out = list(tokens)
    low, high = WORD_NGRAMS
    for n in range(max(2, low), high + 1):
        out += [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return out


def char_features(text: str) -> list[str]:
    """Character n-grams within word boundaries, as scikit-learn's ``char_wb`` makes them."""
    out = []
    low, high = CHAR_NGRAMS
    for word in plain_text(text).split():
        padded = f" {word} "
        for n in range(low, high + 1):
            offset = 0
            out.append(padded[offset : offset + n])
            while offset + n < len(padded):
                offset += 1
                out.append(padded[offset : offset + n])
            if offset == 0:  # the word is shorter than n: one n-gram, the whole padded word
                break
    return out


class Block:
    """One tf-idf block: vocabulary, idf and the classifier's weights for its features."""

    def __init__(self, terms: list[str], idf: np.ndarray, weights: np.ndarray) -> None:
        self.index = {term: i for i, term in enumerate(terms)}
        self.idf = idf.astype(np.float32)
        self.weights = weights.astype(np.float32)  # (features, classes)

    def scores(self, features: Iterable[str]) -> np.ndarray:
        counts = Counter(i for i in (self.index.get(f) for f in features) if i is not None)
        if not counts:
            return np.zeros(self.weights.shape[1], dtype=np.float32)
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        tf = np.fromiter((1.0 + math.log(c) for c in counts.values()), dtype=np.float32, count=len(counts))
        values = tf * self.idf[ids]
        values /= np.linalg.norm(values)
        return np.asarray(values @ self.weights[ids], dtype=np.float32)


def vector_text(text: str) -> str:
    """What the fastText model reads: lower case, ``!``/``?`` split off (as nade feeds it)."""
    return words_text(text) or "."


class VectorBlock:
    """The sentence-vector block: fastText's vector, standardised, L2-normalised, weighted."""

    def __init__(self, model_path: Path, mean: np.ndarray, scale: np.ndarray, weights: np.ndarray) -> None:
        import fasttext

        self.model = fasttext.load_model(str(model_path))
        if self.model.get_dimension() != mean.shape[0]:
            raise ValueError(f"{model_path} gives {self.model.get_dimension()}-dimensional vectors, "
                             f"the emotion model expects {mean.shape[0]}")
        self.mean = mean.astype(np.float32)
        self.scale = scale.astype(np.float32)
        self.weights = weights.astype(np.float32)  # (dimensions, classes)

    def scores(self, texts: list[str]) -> np.ndarray:
        """(texts, classes); one matrix product for the batch."""
        z = standardised(sentence_vectors(self.model, texts), self.mean, self.scale)
        return np.asarray(z @ self.weights, dtype=np.float32)


def sentence_vectors(model: Any, texts: list[str]) -> np.ndarray:
    """fastText's raw sentence vectors, one row per text (training and serving alike)."""
    return np.array([model.get_sentence_vector(vector_text(t)) for t in texts], dtype=np.float32)


def standardised(raw: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Standardised with the training split's mean and scale, then each row to unit length."""
    z = (raw - mean) / scale
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-6)
    return z


class LinearModel:
    def __init__(self, path: Path = MODEL_FILE) -> None:
        with np.load(path, allow_pickle=False) as data:
            classes = [str(c) for c in data["classes"]]
            if set(classes) != set(vocab.EMOTIONS):
                raise ValueError(f"{path} classifies {classes}, not {list(vocab.EMOTIONS)}")
            order = [classes.index(e) for e in vocab.EMOTIONS]  # columns in vocab order
            self.words = Block(_terms(data["word_terms"]), data["word_idf"], data["word_weights"][:, order])
            self.chars = Block(_terms(data["char_terms"]), data["char_idf"], data["char_weights"][:, order])
            self.bias = data["bias"][order].astype(np.float32)
            self.temperature = float(data["temperature"])
            self.vectors = None
            if "vector_weights" in data:
                from bgm.models import nade_word_vectors

                self.vectors = VectorBlock(nade_word_vectors(), data["vector_mean"], data["vector_scale"],
                                           data["vector_weights"][:, order])

    def logits(self, texts: list[str]) -> np.ndarray:
        z = np.stack([self.words.scores(word_features(t)) + self.chars.scores(char_features(t)) for t in texts])
        z += self.bias
        return z + self.vectors.scores(texts) if self.vectors is not None else z

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Calibrated probabilities, one row per text, columns in ``vocab.EMOTIONS`` order."""
        if not texts:
            return np.zeros((0, len(vocab.EMOTIONS)), dtype=np.float32)
        z = self.logits(texts) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _terms(packed: np.ndarray) -> list[str]:
    """Terms are stored as one UTF-8 byte string joined by newlines (compact, no pickle)."""
    return bytes(packed).decode("utf-8").split("\n")


def pack_terms(terms: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8)
