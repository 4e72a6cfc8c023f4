"""Peak memory and wall time of the mixer service on long programmes: each length in a
fresh process that starts the mixer service, sends it a video (a cheap picture), the speech
track (espeak lines with pauses, 48 kHz mono, as the separator hands it on) and the music
track (a looped royalty-free bed, 48 kHz stereo), and receives the remixed file. With
``--separate`` the speech track is first made as the gateway makes it: the speech over an
old bed goes through Separate (DeepFilterNet) and what comes back is mixed.

Reports the process's peak resident memory once ready and at the end, and the wall time of
each call (the mix's from the last track sent to the file received): whether the mixer's
memory stays flat as the programme grows (issue 18).

    python -m bench.mix_memory [--minutes 10 60] [--separate]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

RATE = 48_000
LINE = "The harbour was quiet this morning, and the boats came home early with their nets full."


def make_material(minutes: float, folder: Path) -> tuple[Path, Path, Path]:
    """The video, the speech track and the music track (raw float32 PCM files)."""
    import immich_memories_music

    from bgm import media
    from gateway.example import speak

    seconds = minutes * 60
    n = round(seconds * RATE)
    speak(LINE, folder / "line.wav")
    line = media.decode_audio(folder / "line.wav", RATE, 1, "espeak-ng's speech")[:, 0]
    unit = np.concatenate([line, np.zeros(round(1.5 * RATE), dtype=np.float32)])
    speech = folder / "speech.f32"
    with open(speech, "wb") as f:
        for start in range(0, n, unit.shape[0]):
            f.write(unit[: n - start].astype("<f4").tobytes())
    track = sorted(Path(immich_memories_music.__file__).parent.glob("tracks/calm/*.opus"))[0]
    bed = media.decode_audio(track, RATE, 2, "the bed") * np.float32(0.3)
    music = folder / "music.f32"
    with open(music, "wb") as f:
        for start in range(0, n, bed.shape[0]):
            f.write(bed[: n - start].astype("<f4").tobytes())
    video = folder / "video.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"color=c=navy:s=160x90:r=5:d={seconds}",
                    "-f", "lavfi", "-i", f"anullsrc=r=48000:cl=stereo:d={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-b:a", "32k", "-shortest",
                    str(video)], check=True)
    return video, speech, music


async def separated(address: str, speech: Path, music: Path, folder: Path) -> float:
    """Separate the speech over the old bed (written to ``separated.f32``); its wall time."""
    from bgm.audio import audio_format
    from bgm.client import make_channel
    from bgm.v1 import mixer_pb2, mixer_pb2_grpc

    block = 10 * RATE

    async def requests() -> AsyncIterator[mixer_pb2.SeparateRequest]:
        yield mixer_pb2.SeparateRequest(config=mixer_pb2.SeparateConfig(format=audio_format(RATE, 1)))
        with open(speech, "rb") as s, open(music, "rb") as m:
            while voice := s.read(block * 4):
                bed = np.frombuffer(m.read(len(voice) * 2), dtype="<f4").reshape(-1, 2).mean(axis=1)
                mixture = np.frombuffer(voice, dtype="<f4") + 2.0 * bed[: len(voice) // 4]
                for start in range(0, mixture.shape[0], 2**18):
                    yield mixer_pb2.SeparateRequest(audio=mixture[start : start + 2**18].astype("<f4").tobytes())

    began = time.perf_counter()
    async with make_channel(address) as channel:
        with open(folder / "separated.f32", "wb") as out:
            async for event in mixer_pb2_grpc.MixerStub(channel).Separate(requests(), timeout=7200):
                if event.WhichOneof("event") == "chunk":
                    out.write(event.chunk.data)
    return time.perf_counter() - began


async def mix(minutes: float, folder: Path, separate: bool = False) -> dict[str, float]:
    from bgm.audio import audio_format
    from bgm.chunks import iter_file_chunks
    from bgm.client import make_channel
    from bgm.server import start_server
    from bgm.settings import ServerSettings
    from bgm.v1 import mixer_pb2, mixer_pb2_grpc
    from services.mixer.servicer import MixerServicer
    from services.mixer.settings import MixerSettings

    video, speech, music = make_material(minutes, folder)
    settings = ServerSettings(max_duration_s=minutes * 60 + 60, max_input_bytes=1 << 40, tmp_dir=str(folder))
    running = await start_server([MixerServicer(MixerSettings(), settings)], settings)
    try:
        await running.wait_ready(300)
        ready_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        separate_s = await separated(running.address, speech, music, folder) if separate else 0.0
        if separate:
            speech = folder / "separated.f32"
        sent = [0.0]

        async def requests() -> AsyncIterator[mixer_pb2.MixRequest]:
            yield mixer_pb2.MixRequest(config=mixer_pb2.MixConfig(
                original_name=video.name, speech_format=audio_format(RATE, 1), bgm_format=audio_format(RATE, 2)))
            for kind, path in ((mixer_pb2.TRACK_ORIGINAL, video), (mixer_pb2.TRACK_SPEECH, speech),
                               (mixer_pb2.TRACK_BGM, music)):
                for piece in iter_file_chunks(path):
                    yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=kind, data=piece))
                yield mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=kind, last=True))
            sent[0] = time.perf_counter()

        received, loudness, peak = 0, 0.0, 0.0
        async with make_channel(running.address) as channel:
            async for event in mixer_pb2_grpc.MixerStub(channel).MixAndMux(requests(), timeout=7200):
                if event.WhichOneof("event") == "media":
                    received += len(event.media)
                elif event.WhichOneof("event") == "result":
                    loudness, peak = event.result.loudness_lufs, event.result.true_peak_dbtp
        return {"separate_s": separate_s, "mix_s": time.perf_counter() - sent[0], "file_mb": received / 2**20,
                "ready_mb": ready_kib / 1024,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "loudness_lufs": loudness, "true_peak_dbtp": peak}
    finally:
        await running.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--separate", action="store_true", help="make the speech track with Separate first")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        with tempfile.TemporaryDirectory(prefix="bgm-mixmem-") as folder:
            print(json.dumps(asyncio.run(mix(args.child, Path(folder), args.separate))))
        return
    for minutes in args.minutes:
        out = subprocess.run([sys.executable, "-m", "bench.mix_memory", "--child", str(minutes),
                              *(["--separate"] if args.separate else [])], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{minutes:g} min: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        separate = f"separate {r['separate_s']:.1f} s, " if args.separate else ""
        print(f"{minutes:5g} min: mixer peak {r['peak_mb']:7.0f} MB (ready {r['ready_mb']:.0f} MB); {separate}"
              f"mix {r['mix_s']:.1f} s after the last track (RTF {r['mix_s'] / (minutes * 60):.3f}); "
              f"{r['loudness_lufs']:.2f} LUFS, {r['true_peak_dbtp']:.2f} dBTP", flush=True)


if __name__ == "__main__":
    main()
