"""Sentences per second for each emotion backend, same sentences, same run.

nade runs with its shipped weights. The transformers backend runs a DistilRoBERTa of the
full size of j-hartmann/emotion-english-distilroberta-base (6 layers, 768 wide, 82 M
parameters), built from that config with random weights: speed does not depend on the
weights, and the real ones cannot be downloaded here.

    python -m bench.emotion_throughput [--sentences 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.emotion_sentences import LABELLED


def full_size_model(directory: Path) -> Path:
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from tests.tiny_models import HARTMANN_LABELS, tiny_text_classifier

    tiny_text_classifier(directory)  # for its tokenizer
    config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514,
                           id2label=dict(enumerate(HARTMANN_LABELS)),
                           label2id={label: i for i, label in enumerate(HARTMANN_LABELS)})
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(directory)
    return directory


def measure(backend, sentences: list[str]) -> float:
    backend.classify(sentences[:8], 0.3)  # warm-up
    started = time.perf_counter()
    backend.classify(sentences, 0.3)
    return len(sentences) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=512)
    args = parser.parse_args()
    pool = [s for texts in LABELLED.values() for s in texts]
    sentences = (pool * (args.sentences // len(pool) + 1))[: args.sentences]

    from services.emotion.backends import NadeBackend, TransformersBackend

    results = {"nade": measure(NadeBackend(), sentences)}
    with tempfile.TemporaryDirectory() as tmp:
        model = full_size_model(Path(tmp) / "distilroberta")
        results["transformers (distilroberta size, CPU)"] = measure(TransformersBackend(str(model), "cpu", 32),
                                                                   sentences)
    for name, rate in results.items():
        print(f"{name:40s} {rate:8.1f} sentences/s")
    base = results["nade"]
    for name, rate in results.items():
        print(f"{name:40s} {rate / base:8.3f} x nade")


if __name__ == "__main__":
    main()
