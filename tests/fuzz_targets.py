"""Fuzz targets shared by the bounded test and the longer benchmark run (bench/fuzz.py)."""

from __future__ import annotations

import asyncio
import tempfile

from hypothesis import strategies as st

from bgm.chunks import Spool, iter_chunks, read_config, spool_payload
from bgm.errors import InvalidInput
from bgm.v1 import common_pb2, gateway_pb2, mixer_pb2, music_pb2
from gateway.options import validate

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def remix_options(draw) -> gateway_pb2.RemixOptions:
    o = gateway_pb2.RemixOptions(
        filename=draw(st.text(max_size=300)),
        task=draw(st.integers(-5, 10)),
        language=draw(st.text(max_size=12)),
        separation_backend=draw(st.sampled_from(["", "deepfilternet", "demucs", "x", "DEMUCS"])),
    )
    if draw(st.booleans()):
        o.smoothing.min_span_s = draw(st.floats(allow_nan=True, allow_infinity=True))
    if draw(st.booleans()):
        o.smoothing.neutral_threshold = draw(floats)
    o.music.CopyFrom(music_pb2.MusicStyle(backend=draw(st.sampled_from(["", "auto", "composer", "riffusion", "?"]))))
    for field in ("tempo_bpm", "guidance", "denoising_strength"):
        if draw(st.booleans()):
            setattr(o.music, field, draw(floats))
    if draw(st.booleans()):
        o.music.steps = draw(st.integers(-(2**31), 2**31 - 1))
    for field in ("duck_db", "loudness_lufs", "true_peak_dbtp", "fade_in_s", "fade_out_s", "attack_ms",
                  "release_ms", "bgm_gain_db"):
        if draw(st.booleans()):
            setattr(o.mix, field, draw(floats))
    o.mix.return_stems.extend(draw(st.lists(st.integers(0, 6), max_size=4)))
    return o


@st.composite
def request_streams(draw) -> list[gateway_pb2.RemixRequest]:
    kinds = draw(st.lists(st.sampled_from(["options", "video", "empty"]), max_size=8))
    out = []
    for kind in kinds:
        if kind == "options":
            out.append(gateway_pb2.RemixRequest(options=draw(remix_options())))
        elif kind == "video":
            out.append(gateway_pb2.RemixRequest(video=draw(st.binary(max_size=2048))))
        else:
            out.append(gateway_pb2.RemixRequest())
    return out


def run_gateway_input(messages: list[gateway_pb2.RemixRequest], limit: int = 4096) -> str:
    """The gateway's own input steps: config first, options checked, payload spooled.
    Returns 'ok' or 'refused'; any other exception is a bug."""

    async def go() -> str:
        async def stream():
            for m in messages:
                yield m

        with tempfile.TemporaryDirectory() as tmp:
            try:
                options, rest = await read_config(stream(), "options", "video")
                validate(options)
                with Spool(limit, "the upload", tmp) as spool:
                    await spool_payload(rest, spool, "options", "video")
            except InvalidInput:
                return "refused"
        return "ok"

    return asyncio.run(go())


def reassemble(data: bytes, size: int) -> bytes:
    async def go() -> bytes:
        async def stream():
            yield mixer_pb2.SeparateRequest(config=mixer_pb2.SeparateConfig(format=common_pb2.AudioFormat()))
            for piece in iter_chunks(data, size):
                yield mixer_pb2.SeparateRequest(audio=piece)

        with tempfile.TemporaryDirectory() as tmp:
            _, rest = await read_config(stream(), "config", "audio")
            with Spool(len(data) + 1, "audio", tmp) as spool:
                await spool_payload(rest, spool, "config", "audio")
                return spool.finish().read_bytes()

    return asyncio.run(go())
