"""Emotion classification on real labelled text: the GoEmotions development split mapped
to our seven emotions (``../shared/realworld/emotion``), as written and as a transcript
might give it (lower case, no punctuation), for every backend this machine has.

Reports accuracy, macro-F1, per-class recall, the confusion matrix, the expected calibration
error (15 bins on the top probability) and sentences per second through the Emotion service
over gRPC. The development split is where the shipped model's biases and temperature were
chosen (``tools/train_emotion.py``), so these are development figures, not test figures.

    python -m bench.emotion_eval [--backends goemotions nade] [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import time
from pathlib import Path

import numpy as np

from bgm import vocab
from bgm.client import make_channel
from bgm.server import start_server
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, emotion_pb2, emotion_pb2_grpc
from services.emotion.linear import plain_text
from services.emotion.servicer import EmotionServicer
from services.emotion.settings import EmotionSettings

DATA = Path(__file__).resolve().parents[2] / "shared" / "realworld" / "emotion" / "goemotions_dev_ekman7.csv"


def read(path: Path, limit: int | None) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))[:limit]
    return [r["text"] for r in rows], np.array([vocab.EMOTIONS.index(r["label"]) for r in rows])


def scores(y: np.ndarray, probs: np.ndarray) -> dict[str, object]:
    k = len(vocab.EMOTIONS)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y, predicted), 1)
    recall = confusion.diagonal() / np.maximum(1, confusion.sum(axis=1))
    precision = confusion.diagonal() / np.maximum(1, confusion.sum(axis=0))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(1e-12, precision + recall), 0.0)
    top = probs.max(axis=1)
    bins = np.minimum((top * 15).astype(int), 14)
    ece = sum(abs((predicted[bins == b] == y[bins == b]).mean() - top[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    return {"accuracy": float((predicted == y).mean()), "macro_f1": float(f1.mean()),
            "recall": dict(zip(vocab.EMOTIONS, np.round(recall, 3).tolist(), strict=True)),
            "ece": float(ece), "confusion": confusion}


async def classify(stub: emotion_pb2_grpc.EmotionClassifierStub, texts: list[str]) -> tuple[np.ndarray, float]:
    """Probabilities per text through the service, in batches of 500 one-second sentences."""
    rows = []
    began = time.perf_counter()
    for start in range(0, len(texts), 500):
        batch = texts[start : start + 500]
        request = emotion_pb2.ClassifyRequest(duration_s=float(len(batch)))
        for i, text in enumerate(batch):
            request.segments.append(emotion_pb2.TextSegment(
                text=text, span=common_pb2.TimeSpan(start_s=float(i), end_s=float(i + 1)), confidence=1.0))
        reply = await stub.Classify(request, timeout=600)
        for seg in reply.segments:
            probs = {vocab.emotion_name(p.emotion): p.probability for p in seg.probabilities}
            rows.append([probs[e] for e in vocab.EMOTIONS])
    return np.array(rows, dtype=np.float32), len(texts) / (time.perf_counter() - began)


async def evaluate(backend: str, texts: list[str], y: np.ndarray) -> None:
    server = ServerSettings(max_message_bytes=vocab.MAX_MESSAGE_BYTES)
    began = time.perf_counter()
    running = await start_server([EmotionServicer(EmotionSettings(backend=backend), server)], server)
    try:
        await running.wait_ready(600)
    except Exception as exc:  # a backend this machine lacks (no weights, no torch)
        print(f"\n== {backend}: not available ({exc})")
        await running.stop(0)
        return
    loaded = time.perf_counter() - began
    async with make_channel(running.address) as channel:
        stub = emotion_pb2_grpc.EmotionClassifierStub(channel)
        for name, variant in (("as written", texts), ("transcript-like", [plain_text(t) for t in texts])):
            probs, rate = await classify(stub, variant)
            s = scores(y, probs)
            print(f"\n== {backend}, {name} ({len(texts)} sentences; service up in {loaded:.1f} s)")
            print(f"accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}  ECE {s['ece']:.3f}  "
                  f"{rate:.0f} sentences/s through the service")
            print("recall " + "  ".join(f"{k} {v:.2f}" for k, v in s["recall"].items()))  # type: ignore[attr-defined]
            print("confusion (rows: true, columns: predicted, order " + " ".join(vocab.EMOTIONS) + ")")
            print(s["confusion"])
    await running.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(vocab.EMOTION_BACKENDS))
    parser.add_argument("--limit", type=int, help="first N sentences only")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    texts, y = read(args.data, args.limit)
    for backend in args.backends:
        asyncio.run(evaluate(backend, texts, y))


if __name__ == "__main__":
    main()
