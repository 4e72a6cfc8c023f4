"""The residue expander's setting, measured on the kept speech alone (no remix, no music).

Each real recording (``../shared/realworld``, re-spaced with pauses, its bed ``--level`` LU
under it) goes through DeepFilterNet and then the expander (``services/mixer/residue.py``)
at each ``power/knee`` given; per setting and clip: the old bed's level relative to the
speech in pauses and under speech (``bench.measures``), Whisper tiny.en's WER on the kept
speech, and SI-SDR of the kept speech against the clean speech. ``--no-bed`` runs the clean
recordings alone: what the expander does to speech that has nothing to remove (a recording
whose "clean" reference holds noise scores lower as that noise goes). ``--gains-db`` also
transcribes the same kept speech turned up or down: how far Whisper tiny.en's WER moves with
the level alone (in a remix the speech's level follows the programme's loudness).

    python -m bench.residue [--settings 1/1 2/0.8 ...] [--level 12] [--no-bed] [--gains-db 0 -6 2] [--ids ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench import measures, realworld
from bench.quality import Transcriber
from services.mixer import residue, separation
from services.mixer.settings import MixerSettings


def setting(text: str) -> tuple[float, float]:
    power, knee = text.split("/")
    return float(power), float(knee)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=setting, nargs="+", default=[(1.0, 1.0), (2.0, 0.8)],
                        help="power/knee pairs (1/1: the expander off)")
    parser.add_argument("--level", type=float, default=12.0, help="the bed, LU under the speech")
    parser.add_argument("--no-bed", action="store_true", help="the clean recordings alone")
    parser.add_argument("--gains-db", type=float, nargs="+", default=[0.0],
                        help="WER of the kept speech at each of these gains (the first one is pooled)")
    parser.add_argument("--ids", nargs="*", help="manifest ids of the recordings to use (default: all)")
    args = parser.parse_args()
    separator = separation.DeepFilterNet(MixerSettings().attenuation_limit_db)
    listen = Transcriber()
    ids = tuple(args.ids) if args.ids else None
    with tempfile.TemporaryDirectory() as folder:
        cases = realworld.cases(Path(folder), (args.level,), ids, example=False)
    pooled = {s: [0, 0] for s in args.settings}
    print(f"{'input':38s} {'power/knee':>10s} {'bed pause':>9s} {'under':>6s} {'SI-SDR':>6s}  WER % at "
          + ", ".join(f"{g:+g} dB" for g in args.gains_db))
    for case in cases:
        mixture = case.speech if args.no_bed else case.speech + case.bed
        words = len(measures.normalise_text(case.reference).split())
        for power, knee in args.settings:
            kept = np.concatenate(list(residue.expand(mixture, separator.speech_blocks(mixture), power, knee)))
            levels = measures.bed_levels(kept, case.speech, case.bed, np.zeros_like(kept), case.talking)
            errors = [measures.word_errors(case.reference, listen(kept * 10 ** (g / 20)))[0] for g in args.gains_db]
            pooled[(power, knee)][0] += errors[0]
            pooled[(power, knee)][1] += words
            print(f"{case.name:38s} {f'{power:g}/{knee:g}':>10s} {levels['bed_pause_db']:9.1f} "
                  f"{levels['bed_under_speech_db']:6.1f} {measures.si_sdr(kept, case.speech):6.1f}  "
                  + ", ".join(f"{100 * e / words:.1f}" for e in errors), flush=True)
    for (power, knee), (wrong, words) in pooled.items():
        print(f"pooled WER at {power:g}/{knee:g}: {100 * wrong / max(1, words):.1f} % over {words} words")


if __name__ == "__main__":
    main()
