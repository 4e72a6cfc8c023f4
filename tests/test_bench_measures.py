"""The benchmarks' word count: a word Whisper writes another way is not an error."""

from __future__ import annotations

from bench import measures


def test_titles_and_numbers_are_spelled_out_before_words_are_counted():
    assert measures.normalise_text("Mr. Quilter, for the 20th time; the 15th century.") == \
        "mister quilter for the twentieth time the fifteenth century"
    assert measures.normalise_text("21st 42 3rd 12th 90th 1st 2nd 8th 9th") == \
        "twenty first forty two third twelfth ninetieth first second eighth ninth"
    assert measures.word_errors("For the twentieth time, Mister Quilter", "for the 20th time mr quilter") == (0, 6)


def test_a_different_word_still_counts():
    assert measures.word_errors("tore down the barn", "tore down the bomb") == (1, 4)
    assert measures.word_errors("and so, my fellow", "and so am I fellow") == (2, 4)
