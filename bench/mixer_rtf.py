"""Real-time factors of the mixer: each separation backend, and mix + mux, same audio, same run.

demucs runs the full htdemucs architecture (48 channels, depth 4, 5 transformer layers,
7.8 s segments) built from its config with random weights: speed does not depend on the
weights, and the real ones cannot be downloaded here.

    python -m bench.mixer_rtf [--seconds 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gateway.example import make_example
from services.mixer import dsp, mux, render
from services.mixer.separation import DeepFilterNet, Demucs


def full_size_htdemucs(path: Path) -> Path:
    import torch
    from demucs.htdemucs import HTDemucs

    from tests.tiny_models import demucs_package

    torch.manual_seed(0)
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], segment=7.8)
    torch.save(demucs_package(model), path)
    return path


def timed(fn, *args) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    from bgm import media

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        video = make_example(tmp / "v.mp4", section_s=args.seconds / 3)
        mono = media.decode_audio(video, dsp.SAMPLE_RATE, 1)[:, 0]
        seconds = mono.shape[0] / dsp.SAMPLE_RATE
        results = {}
        dfn = DeepFilterNet()
        results["separate: deepfilternet"], speech = timed(dfn.speech, mono)
        demucs = Demucs(str(full_size_htdemucs(tmp / "htdemucs.th")), "cpu")
        results["separate: demucs (htdemucs size, CPU)"], _ = timed(demucs.speech, mono)

        stereo_speech = np.repeat(speech[:, None], 2, axis=1)
        bgm = np.repeat(mono[:, None], 2, axis=1) * 0.5
        levels = dsp.MixLevels(12, -14, -1, 1.5, 3, 80, 400, -6)

        def mix_and_mux() -> None:
            outcome = render.mix(stereo_speech, bgm, levels)
            info = media.probe(video)
            mux.mux(video, info, outcome.blocks(), mux.output_for(video.name, info), tmp / "out.mp4", "192k")

        results["mix + mux"], _ = timed(mix_and_mux)
    print(f"audio: {seconds:.0f} s")
    for name, secs in results.items():
        print(f"{name:40s} {secs:7.2f} s   real-time factor {secs / seconds:.3f}")


if __name__ == "__main__":
    main()
