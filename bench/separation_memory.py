"""Memory the separator itself adds while it cleans a programme: DeepFilterNet (the default),
then the residue expander (in the bass by default; the whole band where
``BGM_MIXER_RESIDUE_POWER`` turns it on), on N minutes of
noise-like audio at 48 kHz, in a fresh process per length, the blocks consumed as the
mixer's Separate consumes them. Reports the peak resident memory over what the process held
with the input already decoded (the input itself is the caller's).

    python -m bench.separation_memory [--minutes 10 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(minutes: float) -> dict[str, float]:
    import numpy as np

    from bgm import settings as settings_module
    from bgm import vocab
    from services.mixer import residue, separation
    from services.mixer.settings import MixerSettings

    settings = settings_module.load(MixerSettings, vocab.MIXER.env_prefix)  # BGM_MIXER_RESIDUE_POWER=2: the whole band
    separator = separation.create(vocab.SEPARATION_DEEPFILTERNET)
    mono = np.random.default_rng(0).standard_normal(int(minutes * 60 * separation.SAMPLE_RATE), dtype=np.float32)
    mono *= 0.05
    ready_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began, samples = time.perf_counter(), 0
    blocks = separator.speech_blocks(mono)
    for block in residue.expand(mono, blocks, settings.expansion):
        samples += block.shape[0]
    assert samples == mono.shape[0]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"minutes": minutes, "input_mib": mono.nbytes / 2**20, "ready_mib": ready_kib / 1024,
            "added_mib": (peak_kib - ready_kib) / 1024, "rtf": (time.perf_counter() - began) / (minutes * 60)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 20.0])
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    for minutes in args.minutes:
        out = subprocess.run([sys.executable, "-m", "bench.separation_memory", "--child", str(minutes)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['minutes']:g} min: input {r['input_mib']:.0f} MiB; separating added {r['added_mib']:.0f} MiB "
              f"(process {r['ready_mib']:.0f} MiB before); RTF {r['rtf']:.3f}")


if __name__ == "__main__":
    main()
