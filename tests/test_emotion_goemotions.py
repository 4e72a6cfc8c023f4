"""The shipped offline emotion model: it loads from the repository, reads transcripts with
or without punctuation alike, and gets clear sentences right (the ones nade sent to neutral)."""

from __future__ import annotations

import numpy as np
import pytest

from bgm import vocab
from services.emotion import linear
from services.emotion.backends import GoEmotionsBackend

CLEAR = [
    ("I can't wait for the trip tomorrow, I'm so excited!", vocab.JOY),
    ("Wow, I did not expect that at all!", vocab.SURPRISE),
    ("I am absolutely furious with them, this is outrageous.", vocab.ANGER),
    ("I miss him so much, I cried all night.", vocab.SADNESS),
    ("I'm terrified that something bad will happen to her.", vocab.FEAR),
    ("That is disgusting, it makes me sick.", vocab.DISGUST),
    ("The meeting is at three in room four.", vocab.NEUTRAL),
    ("I am furious with him.", vocab.ANGER),  # "furious": 7 times in the training text
    ("Yuck, the milk has gone sour.", vocab.DISGUST),
]


@pytest.fixture(scope="module")
def backend() -> GoEmotionsBackend:
    return GoEmotionsBackend()


def test_the_model_ships_small_with_its_attribution():
    assert linear.MODEL_FILE.is_file()
    assert linear.MODEL_FILE.stat().st_size <= 25 * vocab.MIB
    assert "Apache" in (linear.MODEL_FILE.parent / "README.md").read_text()


@pytest.mark.parametrize(("text", "emotion"), CLEAR)
def test_clear_sentences_with_and_without_punctuation(backend, text, emotion):
    probs = backend.classify([text, linear.plain_text(text)], neutral_threshold=0.3)
    assert probs.shape == (2, len(vocab.EMOTIONS))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [vocab.EMOTIONS[i] for i in probs.argmax(axis=1)] == [emotion, emotion]


def test_char_ngrams_follow_scikit_learn_char_wb():
    from sklearn.feature_extraction.text import CountVectorizer

    text = "Oh no, I'm so sad... a b"
    ours = sorted(linear.char_features(text))
    theirs = CountVectorizer(analyzer="char_wb", ngram_range=linear.CHAR_NGRAMS,
                             preprocessor=linear.plain_text).build_analyzer()(text)
    assert ours == sorted(theirs)


def test_empty_and_odd_text_gets_probabilities(backend):
    probs = backend.classify(["", "   ", "?!", "123"], neutral_threshold=0.3)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_the_sentence_vectors_are_part_of_the_model_and_batching_changes_nothing(backend):
    """The shipped model carries nade's sentence-vector block; a batch scores as its texts
    one by one, and the vectors move the scores (they are not a zero block)."""
    model = backend.model
    assert model.vectors is not None
    texts = ["I am furious with him.", "what a lovely day", "", "Yuck!"]
    together = model.logits(texts)
    alone = np.concatenate([model.logits([t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.abs(model.vectors.scores(texts)).max() > 0.1
