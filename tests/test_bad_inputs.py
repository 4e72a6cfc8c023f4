"""Malformed input of every kind, sent to the gateway (and through it to every service):
each gets a clear status, nothing crashes or hangs, the gateway keeps serving, and no
temporary file is left behind. The count of distinct cases is printed."""

from __future__ import annotations

import struct
import tempfile
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from bgm.chunks import iter_chunks
from bgm.settings import ServerSettings
from bgm.v1 import gateway_pb2, gateway_pb2_grpc, mixer_pb2, music_pb2, stt_pb2
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from services.embedded import EmbeddedServices
from tests.conftest import bgm_temp_files, channel, health_status, start
from tests.media_files import ffmpeg

INVALID = {grpc.StatusCode.INVALID_ARGUMENT}
# A damaged file may still decode (then it is remixed: OK) or not (INVALID_ARGUMENT).
DAMAGED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def media_samples(d: Path) -> dict[str, bytes]:
    files = {}
    common = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2",
              "-f", "lavfi", "-i", "sine=frequency=440:duration=2"]
    ffmpeg(*common, "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(d / "a.mp4"))
    ffmpeg(*common, "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(d / "a.mkv"))
    ffmpeg(*common, "-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libopus", "-shortest", str(d / "a.webm"))
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=330:duration=2", str(d / "a.wav"))
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=330:duration=2", "-c:a", "libmp3lame", str(d / "a.mp3"))
    for name in ("a.mp4", "a.mkv", "a.webm", "a.wav", "a.mp3"):
        files[name] = (d / name).read_bytes()
    return files


def ten_hour_wav_header() -> bytes:
    """A WAV header that claims 10 hours (8 kHz mono: a RIFF size field holds under 4 GiB),
    followed by one second of silence."""
    rate, channels, bits = 8_000, 1, 16
    data_bytes = 10 * 3600 * rate * channels * bits // 8
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return header + b"data" + struct.pack("<I", data_bytes) + bytes(rate * channels * 2)


def flip(data: bytes, at: float, count: int = 64) -> bytes:
    out = bytearray(data)
    start = int(len(out) * at)
    for i in range(start, min(len(out), start + count)):
        out[i] ^= 0xFF
    return bytes(out)


def cases(files: dict[str, bytes]) -> list[tuple[str, list[gateway_pb2.RemixRequest], set]]:
    def upload(name: str, data: bytes, **options) -> list[gateway_pb2.RemixRequest]:
        msgs = [gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename=name, **options))]
        return msgs + [gateway_pb2.RemixRequest(video=p) for p in iter_chunks(data)]

    rng = np.random.default_rng(7)
    out: list[tuple[str, list[gateway_pb2.RemixRequest], set]] = []
    for size in (1, 1024, 2**20):
        out.append((f"random {size} bytes", upload("x.mp4", rng.bytes(size)), INVALID))
    for ext in ("mp4", "mkv", "webm"):
        data = files[f"a.{ext}"]
        for at in (8, 64, 512, 4096, 0.25, 0.5, 0.9):
            offset = at if isinstance(at, int) else int(len(data) * at)
            out.append((f"{ext} cut at {offset}", upload(f"x.{ext}", data[:offset]), DAMAGED))
        for at in (0.0, 0.1, 0.5, 0.95):
            out.append((f"{ext} bytes flipped at {at:.0%}", upload(f"x.{ext}", flip(data, at)), DAMAGED))
    out.append(("0-byte file", upload("x.mp4", b""), INVALID))
    out.append(("wav header, no samples", upload("x.wav", files["a.wav"][:44]), INVALID))
    # ffprobe measures the data actually there rather than the header's claim: one second.
    out.append(("10-hour silent header", upload("x.wav", ten_hour_wav_header()), DAMAGED))
    out.append(("audio only (wav)", upload("x.wav", files["a.wav"]), {grpc.StatusCode.OK}))
    out.append(("audio only (mp3)", upload("x.mp3", files["a.mp3"]), {grpc.StatusCode.OK}))
    out.append(("hls playlist", upload("x.m3u8", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n/etc/hostname\n"
                                                  b"#EXT-X-ENDLIST\n"), INVALID))
    out.append(("concat list", upload("x.txt", b"ffconcat version 1.0\nfile '/etc/hostname'\n"), INVALID))
    out.append(("text file", upload("x.mp4", b"hello, this is not a video\n" * 100), INVALID))
    valid = upload("x.mp4", files["a.mp4"])
    out.append(("chunks before options", [*valid[1:], valid[0]], INVALID))
    out.append(("options missing", valid[1:], INVALID))
    out.append(("options repeated", [valid[0], valid[0], *valid[1:]], INVALID))
    out.append(("empty stream", [], INVALID))
    out.append(("oversized chunk", [valid[0], gateway_pb2.RemixRequest(video=bytes(6 * 2**20))],
                {grpc.StatusCode.RESOURCE_EXHAUSTED}))
    absurd = {
        "min span negative": {"smoothing": {"min_span_s": -5}},
        "min span infinite": {"smoothing": {"min_span_s": float("inf")}},
        "tempo 1000": {"music": music_pb2.MusicStyle(tempo_bpm=1000)},
        "steps 0": {"music": music_pb2.MusicStyle(steps=0)},
        "strength 2": {"music": music_pb2.MusicStyle(denoising_strength=2)},
        "unknown music backend": {"music": music_pb2.MusicStyle(backend="kazoo")},
        "unknown music style": {"music": music_pb2.MusicStyle(style="polka")},
        "intensity 1.5": {"music": music_pb2.MusicStyle(intensity=1.5)},
        "duck 500 dB": {"mix": mixer_pb2.MixOptions(duck_db=500)},
        "loudness +10 LUFS": {"mix": mixer_pb2.MixOptions(loudness_lufs=10)},
        "true peak -100": {"mix": mixer_pb2.MixOptions(true_peak_dbtp=-100)},
        "language 'english'": {"language": "english"},
        "unknown task": {"task": 99},
        "unknown separation": {"separation_backend": "magic"},
    }
    for name, options in absurd.items():
        out.append((f"option: {name}", upload("x.mp4", files["a.mp4"], **options), INVALID))
    for name in ("../../etc/passwd.mp4", "x.mp4\0.exe", "a" * 300 + ".mp4", "x\x01.mp4"):
        out.append((f"file name {name[:20]!r}", upload(name, files["a.mp4"]), INVALID))
    # A dot that starts no extension is part of the name: the container is found by probing.
    for name in ("Dr. Who interview", "x.m$4"):
        out.append((f"file name {name!r}", upload(name, files["a.mp4"]), {grpc.StatusCode.OK}))
    return out


@pytest.fixture(scope="module")
def gateway(loop):
    running = start(loop, [GatewayServicer(GatewaySettings(), ServerSettings(), EmbeddedServices())])
    yield gateway_pb2_grpc.GatewayStub(channel(running.address)), running
    loop.run(running.stop(1))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return cases(media_samples(tmp_path_factory.mktemp("media")))


def test_malformed_inputs_get_clear_statuses_and_leave_nothing(gateway, suite):
    stub, running = gateway
    big = grpc.insecure_channel(running.address, options=[("grpc.max_send_message_length", 16 * 2**20)])
    big_stub = gateway_pb2_grpc.GatewayStub(big)
    before = bgm_temp_files()
    outcomes = {}
    for name, messages, expected in suite:
        use = big_stub if name == "oversized chunk" else stub
        try:
            for _ in use.Remix(iter(messages), timeout=180):
                pass
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        outcomes[name] = code
        assert code in expected, f"{name}: {code.name} {details}"
        if code != grpc.StatusCode.OK:
            assert details and "Traceback" not in details and len(details) < 500, (name, details)
            assert tempfile.gettempdir() not in details, (name, details)  # no server paths
        assert health_status(channel(running.address), "bgm.v1.Gateway") == "SERVING", name
    assert bgm_temp_files() <= before
    print(f"\n{len(outcomes)} malformed inputs: " + ", ".join(
        f"{code.name} x{list(outcomes.values()).count(code)}" for code in set(outcomes.values())))
    assert len(outcomes) >= 50


def test_an_upload_that_stops_midway_leaves_nothing(gateway, suite):
    stub, running = gateway
    before = bgm_temp_files()
    messages = next(m for name, m, _ in suite if name == "option: tempo 1000")
    valid = [gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename="x.mp4")), *messages[1:]]
    gate = threading.Event()

    def stalled():
        yield valid[0]
        yield valid[1]
        gate.wait(30)

    call = stub.Remix(stalled(), timeout=60)
    codes = []

    def consume():
        try:
            list(call)
        except grpc.RpcError as exc:
            codes.append(exc.code())

    worker = threading.Thread(target=consume)
    worker.start()
    import time

    time.sleep(0.5)  # the upload has begun and stalls half way
    call.cancel()
    gate.set()
    worker.join(10)
    assert codes == [grpc.StatusCode.CANCELLED]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not bgm_temp_files() <= before:
        time.sleep(0.2)
    assert bgm_temp_files() <= before
    assert health_status(channel(running.address), "bgm.v1.Gateway") == "SERVING"
    assert running.servicers[0].limiter.active == 0


def test_uploads_over_the_duration_limit_are_refused(gateway, suite):
    from dataclasses import replace

    stub, running = gateway
    servicer = running.servicers[0]
    original = servicer.server
    servicer.server = replace(original, max_duration_s=1.0)
    try:
        messages = next(m for name, m, _ in suite if name == "audio only (wav)")  # 2 s long
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Remix(iter(messages), timeout=60))
    finally:
        servicer.server = original
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit of 1 s" in info.value.details() and "BGM_GATEWAY_MAX_DURATION_S" in info.value.details()


def test_services_refuse_stt_config_for_unknown_tasks():
    # The gateway's option check mirrors the services' own: one place names the valid tasks.
    assert set(stt_pb2.SttTask.values()) == {0, 1, 2}
