"""The residue expander's setting, measured on the kept speech alone (no remix, no music).

Each real recording (``../shared/realworld``, re-spaced with pauses, its bed ``--level`` LU
under it) goes through DeepFilterNet and then the expander (``services/mixer/residue.py``)
at each setting given; per setting and clip: the old bed's level relative to the
speech in pauses and under speech (``bench.measures``), Whisper tiny.en's WER on the kept
speech, and SI-SDR of the kept speech against the clean speech. A setting is
``power/knee`` (the whole band) or ``power/knee/bass_power/bass_hz``; the default compares
the expander off, the mixer's defaults and the whole band at 2. ``--no-bed`` runs the clean
recordings alone: what the expander does to speech that has nothing to remove (a recording
whose "clean" reference holds noise scores lower as that noise goes). ``--gains-db`` also
transcribes the same kept speech turned up or down: how far Whisper tiny.en's WER moves with
the level alone (in a remix the speech's level follows the programme's loudness).

    python -m bench.residue [--settings 1/1 1/0.8/3/200 2/0.8 ...] [--level 12] [--no-bed]
                            [--gains-db 0 -6 2] [--ids ...]
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


def setting(text: str) -> residue.Expansion:
    return residue.Expansion(*(float(x) for x in text.split("/")))


def label(e: residue.Expansion) -> str:
    return f"{e.power:g}/{e.knee:g}" + (f"/{e.bass_power:g}/{e.bass_hz:g}" if e.bass_hz > 0 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=setting, nargs="+",
                        default=[residue.Expansion(), MixerSettings().expansion, residue.Expansion(2.0, 0.8)],
                        help="power/knee[/bass_power/bass_hz] (1/1: the expander off)")
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
    print(f"{'input':38s} {'setting':>14s} {'bed pause':>9s} {'under':>6s} {'SI-SDR':>6s}  WER % at "
          + ", ".join(f"{g:+g} dB" for g in args.gains_db))
    for case in cases:
        mixture = case.speech if args.no_bed else case.speech + case.bed
        words = len(measures.normalise_text(case.reference).split())
        separated = np.concatenate(list(separator.speech_blocks(mixture)))  # once: the expander is what varies
        for expansion in args.settings:
            kept = np.concatenate(list(residue.expand(mixture, [separated], expansion)))
            levels = measures.bed_levels(kept, case.speech, case.bed, np.zeros_like(kept), case.talking)
            errors = [measures.word_errors(case.reference, listen(kept * 10 ** (g / 20)))[0] for g in args.gains_db]
            pooled[expansion][0] += errors[0]
            pooled[expansion][1] += words
            print(f"{case.name:38s} {label(expansion):>14s} {levels['bed_pause_db']:9.1f} "
                  f"{levels['bed_under_speech_db']:6.1f} {measures.si_sdr(kept, case.speech):6.1f}  "
                  + ", ".join(f"{100 * e / words:.1f}" for e in errors), flush=True)
    for expansion, (wrong, words) in pooled.items():
        print(f"pooled WER at {label(expansion)}: {100 * wrong / max(1, words):.1f} % over {words} words")


if __name__ == "__main__":
    main()
