"""What the listener hears: the old music gone, ducking that breathes, every span audible,
loudness on target, the speech kept. Measured on real recordings from ``../shared/realworld``.

Each input is real speech re-spaced with 2-3 s pauses over a real music bed 12 LU (and
6 LU) under it, plus the project's example video; each is remixed by the embedded gateway
with the defaults and measured against the parts it was built from (``bench.measures``):

- bed pause / under: the old bed's level in the output relative to the speech, in pauses and
  under speech (per-bin least-squares fit onto the known speech, bed and new music);
  rest: everything in the pauses that is not the new music (an upper bound for the bed);
- duck: the new music's median level in pauses minus under speech (from the BGM stem);
- spans: per span, the new music's loudness relative to the speech in that span's pauses
  (its own level) and under its speech (ducked), the fades left out: the lowest span (at its
  own level where it has a pause), and the largest spread between spans in the same state;
- LUFS / dBTP: the programme's integrated loudness and true peak (the decoded output);
- WER in -> out: Whisper tiny.en (``--listener base``: the bundled base) on the input and on
  the output, against the reference, titles and numbers spelled out (pooled, also on the
  kept speech alone: what separation costs before any music is added); ``--words`` prints
  what was heard where a word was wrong;
- SI-SDR in -> kept: the input and the kept speech (SPEECH stem) against the clean speech.

    python -m bench.quality [--levels 12 6] [--ids jfk_inaugural_1961 ...] [--no-example] [--json F]
                            [--words] [--listener tiny.en|base]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile

from bench import measures, realworld
from bgm import media
from bgm.chunks import iter_file_chunks
from bgm.client import make_channel
from bgm.models import WHISPER_BUNDLED
from bgm.server import start_server
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, mixer_pb2
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from services.embedded import EmbeddedServices
from services.mixer import dsp
from services.mixer.settings import MixerSettings

RATE = realworld.RATE
# The mix's default fades, left out of the per-span levels.
FADES_S = (MixerSettings.fade_in_s, MixerSettings.fade_out_s)


@dataclass
class Remixed:
    video: bytes
    stems: dict[int, np.ndarray]  # stem -> (n,) mono
    spans: list[tuple[str, float, float]]


@dataclass
class Row:
    name: str
    bed_pause_db: float
    bed_under_speech_db: float
    pause_rest_db: float
    duck_db: float
    span_min_db: float
    span_spread_db: float
    lufs: float
    dbtp: float
    words: int
    errors_in: int
    errors_out: int
    errors_kept: int  # the SPEECH stem alone: what separation and the gate cost, without the music
    si_sdr_in: float
    si_sdr_kept: float
    video_identical: bool
    duration_equal: bool
    seconds: float
    heard: str = ""  # what the listener (Whisper) heard in the output (empty without one)


def requests(video: Path, options: gateway_pb2.RemixOptions | None = None) -> Iterator[gateway_pb2.RemixRequest]:
    """A Remix call's requests that also ask for the SPEECH and BGM stems."""
    opts = gateway_pb2.RemixOptions()
    if options is not None:
        opts.CopyFrom(options)
    opts.filename = video.name
    opts.mix.return_stems[:] = [mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_BGM]
    yield gateway_pb2.RemixRequest(options=opts)
    for piece in iter_file_chunks(video):
        yield gateway_pb2.RemixRequest(video=piece)


def collect(events: Iterable[gateway_pb2.RemixResponse]) -> Remixed:
    out, spans = io.BytesIO(), []
    stems: dict[int, io.BytesIO] = {}
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "video":
            out.write(event.video)
        elif kind == "stem":
            stems.setdefault(event.stem.stem, io.BytesIO()).write(event.stem.data)
        elif kind == "timeline":
            spans = [(common_pb2.Emotion.Name(s.emotion), s.span.start_s, s.span.end_s)
                     for s in event.timeline.spans]
    decoded = {k: soundfile.read(io.BytesIO(v.getvalue()), dtype="float32", always_2d=True)[0].mean(axis=1)
               for k, v in stems.items()}
    return Remixed(out.getvalue(), decoded, spans)


async def remix(stub: gateway_pb2_grpc.GatewayStub, video: Path,
                options: gateway_pb2.RemixOptions | None = None) -> Remixed:
    async def sent():
        for request in requests(video, options):
            yield request

    return collect([event async for event in stub.Remix(sent(), timeout=3600)])


class Transcriber:
    """Whisper on 48 kHz mono: tiny.en, what the product transcribes with, or the bundled
    multilingual base, a second listener that turns fewer single words over."""

    def __init__(self, model: str = "tiny.en") -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(WHISPER_BUNDLED[model]()), device="cpu", compute_type="int8")

    def __call__(self, mono48k: np.ndarray) -> str:
        segments, _ = self.model.transcribe(realworld.resample_to(mono48k, 16_000), language="en", beam_size=5,
                                            vad_filter=True)
        return " ".join(s.text for s in segments)


def measure(case: realworld.Case, result: Remixed, folder: Path, listen: Transcriber | None,
            seconds: float = float("nan")) -> Row:
    """Every figure of one remix (``listen=None`` leaves the WER out)."""
    out_path = folder / f"{case.name}.remixed{case.video.suffix}"
    out_path.write_bytes(result.video)
    stereo = media.decode_audio(out_path, RATE, 2, "the remix")
    n = min(stereo.shape[0], case.speech.shape[0])
    output = stereo[:n].mean(axis=1)
    music = result.stems[mixer_pb2.STEM_BGM][:n]
    kept = result.stems[mixer_pb2.STEM_SPEECH][:n]
    speech, bed = case.speech[:n], case.bed[:n]
    lag = measures.align(output, speech)
    output = measures.shift(output, lag)
    levels = measures.bed_levels(output, speech, bed, music, case.talking)
    speech_lufs = dsp.loudness(kept)
    spans = [(a, b) for _, a, b in result.spans] or [(0.0, n / RATE)]
    levels_by_span = measures.span_loudness(music, spans, speech, case.talking, FADES_S)
    spread, lowest = measures.spread_and_lowest([(p - speech_lufs, u - speech_lufs) for p, u in levels_by_span])
    mixture = speech + bed
    heard = listen(output) if listen else ""
    return Row(
        name=case.name, **levels,
        duck_db=measures.ducking_db(music, speech, case.talking),
        span_min_db=lowest, span_spread_db=spread,
        lufs=dsp.loudness(stereo), dbtp=dsp.true_peak_db(stereo),
        words=len(measures.normalise_text(case.reference).split()),
        errors_in=measures.word_errors(case.reference, listen(mixture))[0] if listen else -1,
        errors_out=measures.word_errors(case.reference, heard)[0] if listen else -1,
        errors_kept=measures.word_errors(case.reference, listen(kept))[0] if listen else -1,
        si_sdr_in=measures.si_sdr(mixture, speech), si_sdr_kept=measures.si_sdr(kept, speech),
        video_identical=measures.video_md5(out_path) == measures.video_md5(case.video),
        duration_equal=abs(media.probe(out_path).duration_s - media.probe(case.video).duration_s) < 0.05,
        seconds=seconds, heard=heard)


def print_pooled(rows: list[Row]) -> None:
    """WER over all words of a bed level at once: one clip's single word is not a trend."""
    for level in sorted({r.name.rsplit("@", 1)[-1] for r in rows if "@" in r.name}):
        chosen = [r for r in rows if r.name.endswith(f"@{level}") and r.errors_in >= 0]
        words = sum(r.words for r in chosen)
        if words:
            print(f"pooled WER at {level}: {100 * sum(r.errors_in for r in chosen) / words:.1f} % -> "
                  f"{100 * sum(r.errors_out for r in chosen) / words:.1f} % over {words} words "
                  f"(the kept speech alone: {100 * sum(r.errors_kept for r in chosen) / words:.1f} %)")


def print_table(rows: list[Row]) -> None:
    head = (f"{'input':38s} {'bed pause':>9s} {'under':>6s} {'rest':>6s} {'duck':>5s} {'span min':>8s} "
            f"{'spread':>6s} {'LUFS':>6s} {'dBTP':>5s} {'WER in->out':>12s} {'SI-SDR in->kept':>16s} video")
    print(head)
    for r in rows:
        print(f"{r.name:38s} {r.bed_pause_db:9.1f} {r.bed_under_speech_db:6.1f} {r.pause_rest_db:6.1f} "
              f"{r.duck_db:5.1f} {r.span_min_db:8.1f} {r.span_spread_db:6.1f} {r.lufs:6.1f} {r.dbtp:5.1f} "
              f"{100 * r.errors_in / r.words:5.1f}->{100 * r.errors_out / r.words:5.1f} "
              f"{r.si_sdr_in:7.1f}->{r.si_sdr_kept:6.1f} "
              f"{'same' if r.video_identical and r.duration_equal else 'DIFFERENT'}")


async def main_async(args: argparse.Namespace) -> list[Row]:
    if not realworld.available():
        raise SystemExit(f"no real-world material at {realworld.ROOT} (set BGM_REALWORLD)")
    settings = ServerSettings()
    running = await start_server([GatewayServicer(GatewaySettings(), settings, EmbeddedServices())], settings)
    await running.wait_ready(900)
    listen = Transcriber(args.listener)
    rows = []
    try:
        async with make_channel(running.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with tempfile.TemporaryDirectory(prefix="bgm-quality-") as tmp:
                folder = Path(tmp)
                for case in realworld.cases(folder, tuple(args.levels), tuple(args.ids) if args.ids else None,
                                            example=not args.no_example):
                    began = time.perf_counter()
                    result = await remix(stub, case.video)
                    rows.append(measure(case, result, folder, listen, time.perf_counter() - began))
                    print_table(rows[-1:])
                    if args.words and rows[-1].errors_out > 0:
                        print(f"  heard: {rows[-1].heard.strip()}\n  said:  {case.reference}")
    finally:
        await running.stop(1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=float, nargs="+", default=[12.0, 6.0],
                        help="bed levels under the speech, in LU")
    parser.add_argument("--ids", nargs="*", help="manifest ids of the recordings to use (default: all)")
    parser.add_argument("--no-example", action="store_true", help="leave out the example video")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--words", action="store_true", help="print what was heard where a word was wrong")
    parser.add_argument("--listener", choices=sorted(WHISPER_BUNDLED), default="tiny.en",
                        help="the Whisper model the WER is measured with")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    print()
    print_table(rows)
    print_pooled(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
