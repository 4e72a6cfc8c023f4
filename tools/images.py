"""The bgm images: every variant of deploy/Dockerfile and the build arguments that make it.

    python tools/images.py list               # variants, tags and arguments
    python tools/images.py build [NAME ...]   # docker build each (default: the CPU five)

Compose (docker-compose*.yml) passes the same arguments; tests/test_deploy.py checks that
they agree with this table and that each variant's service, extras and packages exist.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "deploy/Dockerfile"
VERSION = "0.1.0"
CUDA_BASE = "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04"


@dataclass(frozen=True)
class Variant:
    name: str  # the image: bgm-<name>
    service: str
    extras: str
    runtime_packages: str
    gpu: bool = False

    def args(self) -> dict[str, str]:
        from bgm import vocab

        port = next(s.port for s in vocab.SERVICES if s.name == self.service)
        out = {"SERVICE": self.service, "PORT": str(port), "EXTRAS": self.extras,
               "RUNTIME_PACKAGES": self.runtime_packages}
        if self.gpu:
            out |= {"BASE": CUDA_BASE, "PYTHON_PACKAGES": "python3 python3-venv", "DEVICE": "cuda",
                    "RUNTIME_PACKAGES": f"python3 {self.runtime_packages}"}
        return out

    @property
    def tag(self) -> str:
        return f"bgm-{self.name}:{VERSION}"


VARIANTS = {v.name: v for v in (
    # No torch in the CPU STT image: faster-whisper runs on CTranslate2.
    Variant("stt", "stt", "stt", "ffmpeg"),
    Variant("emotion", "emotion", "emotion", "libgomp1"),
    Variant("music", "music", "music", "fluidsynth fluid-soundfont-gm"),
    Variant("mixer", "mixer", "mixer", "ffmpeg"),
    # The gateway talks to the four services: no torch, no FluidSynth, no espeak.
    Variant("gateway", "gateway", "gateway", "ffmpeg"),
    Variant("stt-gpu", "stt", "stt", "ffmpeg", gpu=True),
    Variant("music-gpu", "music", "music,music-full", "fluidsynth fluid-soundfont-gm", gpu=True),
    Variant("mixer-gpu", "mixer", "mixer,mixer-full", "ffmpeg", gpu=True),
)}
CPU = [name for name, v in VARIANTS.items() if not v.gpu]


def build_command(variant: Variant) -> list[str]:
    command = ["docker", "build", "-f", DOCKERFILE, "-t", variant.tag]
    for key, value in variant.args().items():
        command += ["--build-arg", f"{key}={value}"]
    return [*command, "."]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python tools/images.py")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    build = sub.add_parser("build")
    build.add_argument("names", nargs="*", help=f"variants (default: {' '.join(CPU)})")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.command == "list":
        for variant in VARIANTS.values():
            print(variant.tag, " ".join(f"{k}={v!r}" for k, v in variant.args().items()))
        return 0
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for name in args.names or CPU:
        print("+", " ".join(build_command(VARIANTS[name])), flush=True)
        subprocess.run(build_command(VARIANTS[name]), cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
