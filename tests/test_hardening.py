"""Round two of hardening: clients that idle, headers that lie, music requests that cost too
much, tracks in any order, settings that would silently weaken the service, and a CLI that
must never overwrite what the user still needs. Each test is a reproduction that failed
before its fix."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from bgm import media, scratch
from bgm.audio import audio_format, float_to_pcm
from bgm.chunks import iter_chunks
from bgm.errors import InvalidInput, Overloaded, read_retry_delay, retry_trailers
from bgm.settings import ServerSettings, SettingsError, server_settings
from bgm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, mixer_pb2, mixer_pb2_grpc, music_pb2, stt_pb2
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from services.embedded import EmbeddedServices
from tests.conftest import bgm_temp_files, channel, start, upload_status_counts
from tests.media_files import ffmpeg

IDLE_S = 3.0


# ----- files whose container header lies ------------------------------------------------
def audio_mkv(path: Path, seconds: float, claimed_s: float | None = None) -> Path:
    """Raw 8 kHz PCM in Matroska; with ``claimed_s``, the header's Duration is overwritten."""
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=300:duration={seconds}:sample_rate=8000",
           "-c:a", "pcm_s16le", str(path))
    if claimed_s is not None:
        data = bytearray(path.read_bytes())
        at = data.find(b"\x44\x89\x88")  # Segment Info's Duration: an 8-byte float, in ms
        assert at > 0
        data[at + 3 : at + 11] = struct.pack(">d", claimed_s * 1000)
        path.write_bytes(bytes(data))
        assert abs(media.probe(path).duration_s - claimed_s) < 0.01  # the header now says so
    return path


def test_a_header_that_understates_is_refused_at_the_limit_quickly(tmp_path):
    lying = audio_mkv(tmp_path / "long.mkv", 600, claimed_s=2)
    began = time.monotonic()
    with pytest.raises(InvalidInput) as info:
        media.probe(lying, "the upload", 60.0, "BGM_GATEWAY_MAX_DURATION_S")
    assert "longer than the limit of 60 s (BGM_GATEWAY_MAX_DURATION_S)" in str(info.value)
    with pytest.raises(InvalidInput):
        media.decode_audio(lying, 48_000, 1, "the upload", 60.0)
    files = [(tmp_path / "a.s16", 48_000), (tmp_path / "b.s16", 16_000)]
    with pytest.raises(InvalidInput, match="limit of 60 s"):  # decoded to files: stopped past the limit
        media.decode_audio_to_files(lying, files, "the upload", 60.0)
    assert not any(path.exists() for path, _ in files)  # and nothing half-decoded is left
    with pytest.raises(InvalidInput, match="limit of 60 s"):  # decoded as it is sent on: stopped past the limit
        for _ in media.decode_pcm(lying, 48_000, 512 * 1024, "the upload", 60.0):
            pass
    assert time.monotonic() - began < 5.0
    short = audio_mkv(tmp_path / "short.mkv", 3)
    assert media.decode_audio_to_files(short, files, "the upload", 60.0) == 3 * 48_000
    assert files[1][0].stat().st_size == 2 * 3 * 16_000
    assert sum(map(len, media.decode_pcm(short, 48_000, 512 * 1024, "the upload", 60.0))) == 2 * 3 * 48_000


def test_a_header_that_overstates_gives_the_real_duration(tmp_path):
    short = audio_mkv(tmp_path / "short.mkv", 3, claimed_s=600)
    assert abs(media.probe(short, "x", 3600.0).duration_s - 3.0) < 0.05


def test_matroska_written_to_a_pipe_has_a_measured_duration(tmp_path):
    piped = tmp_path / "piped.webm"
    subprocess.run(f"ffmpeg -v error -f lavfi -i sine=duration=4 -c:a libopus -f webm pipe:1 > {piped}",
                   shell=True, check=True)
    assert media.probe(piped).duration_s == 0.0  # no duration in the header at all
    assert abs(media.probe(piped, "x", 3600.0).duration_s - 4.0) < 0.05


def test_limits_read_as_people_say_them():
    assert media.format_duration(60) == "60 s"
    assert media.format_duration(600) == "10 min"
    assert media.format_duration(3 * 3600) == "3 h"


# ----- the gateway: idle clients, slots taken when work starts -----------------------------
@pytest.fixture(scope="module")
def gateway(loop):
    running = start(loop, [GatewayServicer(GatewaySettings(), ServerSettings(
        max_concurrency=1, idle_timeout_s=IDLE_S, max_duration_s=60.0), EmbeddedServices())])
    yield gateway_pb2_grpc.GatewayStub(channel(running.address)), running
    loop.run(running.stop(1))


def upload(name: str, data: bytes) -> list[gateway_pb2.RemixRequest]:
    return [gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename=name)),
            *(gateway_pb2.RemixRequest(video=p) for p in iter_chunks(data))]


def held_open(stub, first: list[gateway_pb2.RemixRequest], release: threading.Event, outcome: dict) -> threading.Thread:
    def requests():
        yield from first
        release.wait(60)

    def run():
        began = time.monotonic()
        try:
            for _ in stub.Remix(requests(), timeout=60):
                pass
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome["code"], outcome["details"] = exc.code(), exc.details()
        outcome["after_s"] = time.monotonic() - began

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker


def test_idle_clients_neither_block_others_nor_stay(gateway, tmp_path):
    stub, running = gateway
    before = bgm_temp_files()
    release = threading.Event()
    silent: dict = {}
    options_only: dict = {}
    workers = [held_open(stub, [], release, silent),
               held_open(stub, upload("x.mkv", b"")[:1], release, options_only)]
    time.sleep(0.5)
    # With one work slot, a third client is served while the two hold their streams open.
    clip = audio_mkv(tmp_path / "clip.mkv", 2)
    kinds = [m.WhichOneof("event") for m in stub.Remix(iter(upload("clip.mkv", clip.read_bytes())), timeout=120)]
    assert "video" in kinds and "result" in kinds
    for worker in workers:
        worker.join(IDLE_S + 10)
    release.set()
    for outcome in (silent, options_only):
        assert outcome["code"] == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
        assert "BGM_GATEWAY_IDLE_TIMEOUT_S" in outcome["details"]
        assert outcome["after_s"] < IDLE_S + 5
    assert running.servicers[0].uploads.active == 0 and running.servicers[0].limiter.active == 0
    assert bgm_temp_files() <= before


def test_the_gateway_refuses_an_understating_upload_and_remixes_an_overstating_one(gateway, tmp_path):
    stub, _ = gateway
    lying = audio_mkv(tmp_path / "long.mkv", 600, claimed_s=2)
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Remix(iter(upload("long.mkv", lying.read_bytes())), timeout=120))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 60 s (BGM_GATEWAY_MAX_DURATION_S)" in info.value.details()
    assert time.monotonic() - began < 15

    short = audio_mkv(tmp_path / "short.mkv", 3, claimed_s=600)
    events = list(stub.Analyze(iter(upload("short.mkv", short.read_bytes())), timeout=120))
    timeline = next(e.timeline for e in events if e.WhichOneof("event") == "timeline")
    assert abs(timeline.spans[-1].span.end_s - 3.0) < 0.1  # music for 3 s, not 10 minutes


def test_a_piped_webm_without_a_duration_is_remixed(gateway, tmp_path):
    stub, _ = gateway
    piped = tmp_path / "piped.webm"
    subprocess.run(f"ffmpeg -v error -f lavfi -i testsrc2=size=160x120:rate=25:duration=3 -f lavfi "
                   f"-i sine=duration=3 -c:v libvpx -deadline realtime -c:a libopus -f webm pipe:1 > {piped}",
                   shell=True, check=True)
    result = next(e.result for e in stub.Remix(iter(upload("clip.webm", piped.read_bytes())), timeout=120)
                  if e.WhichOneof("event") == "result")
    assert abs(result.duration_s - 3.0) < 0.1


# ----- the services measure durations themselves ------------------------------------------
def test_transcribe_refuses_audio_past_its_limit(stt_server, tmp_path):
    from services.stt.servicer import SpeechToTextServicer

    servicer: SpeechToTextServicer = stt_server.servicers[0]
    original = servicer.server
    servicer.server = replace(original, max_duration_s=60.0)
    try:
        stub = __import__("bgm.v1.stt_pb2_grpc", fromlist=["x"]).SpeechToTextStub(channel(stt_server.address))
        lying = audio_mkv(tmp_path / "long.mkv", 600, claimed_s=2).read_bytes()
        container = stt_pb2.TranscribeConfig(format=common_pb2.AudioFormat(encoding=common_pb2.ENCODING_CONTAINER))
        pcm = stt_pb2.TranscribeConfig(format=audio_format(16_000, 1))
        silence = float_to_pcm(np.zeros((61 * 16_000, 1), dtype=np.float32))
        for config, data in ((container, lying), (pcm, silence)):
            requests = [stt_pb2.TranscribeRequest(config=config),
                        *(stt_pb2.TranscribeRequest(audio=p) for p in iter_chunks(data))]
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Transcribe(iter(requests), timeout=60))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "limit of 60 s (BGM_STT_MAX_DURATION_S)" in info.value.details()
    finally:
        servicer.server = original


@pytest.fixture(scope="module")
def mixer(loop):
    from services.mixer.servicer import MixerServicer
    from services.mixer.settings import MixerSettings

    running = start(loop, [MixerServicer(MixerSettings(), ServerSettings(max_duration_s=60.0))])
    yield mixer_pb2_grpc.MixerStub(channel(running.address)), running
    loop.run(running.stop(0))


def test_separate_refuses_audio_past_its_limit(mixer):
    stub, _ = mixer
    silence = float_to_pcm(np.zeros((61 * 8_000, 1), dtype=np.float32))
    requests = [mixer_pb2.SeparateRequest(config=mixer_pb2.SeparateConfig(format=audio_format(8_000, 1))),
                *(mixer_pb2.SeparateRequest(audio=p) for p in iter_chunks(silence))]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Separate(iter(requests), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BGM_MIXER_MAX_DURATION_S" in info.value.details()


def mix_requests(original: bytes, order: list[int], name: str = "clip.mkv") -> list[mixer_pb2.MixRequest]:
    rate = 48_000
    config = mixer_pb2.MixConfig(original_name=name, speech_format=audio_format(rate, 1),
                                 bgm_format=audio_format(rate, 1))
    tone = float_to_pcm((0.1 * np.sin(np.arange(2 * rate) / rate * 2 * np.pi * 220))[:, None])
    data = {mixer_pb2.TRACK_ORIGINAL: original, mixer_pb2.TRACK_SPEECH: tone, mixer_pb2.TRACK_BGM: tone}
    out = [mixer_pb2.MixRequest(config=config)]
    for track in order:
        out += [mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=track, data=p)) for p in iter_chunks(data[track])]
        out.append(mixer_pb2.MixRequest(chunk=mixer_pb2.TrackChunk(track=track, last=True)))
    return out


def test_mix_tracks_may_complete_in_any_order(mixer, tmp_path):
    stub, _ = mixer
    original = audio_mkv(tmp_path / "o.mkv", 2).read_bytes()
    last_first = [mixer_pb2.TRACK_BGM, mixer_pb2.TRACK_SPEECH, mixer_pb2.TRACK_ORIGINAL]
    events = list(stub.MixAndMux(iter(mix_requests(original, last_first)), timeout=60))
    assert any(e.WhichOneof("event") == "result" for e in events)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.MixAndMux(iter(mix_requests(original, [mixer_pb2.TRACK_BGM, mixer_pb2.TRACK_SPEECH])), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no ORIGINAL track was sent" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.MixAndMux(iter(mix_requests(original, last_first, name="clip\0.mkv")), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "original_name" in info.value.details()


# ----- music: what a request may cost ---------------------------------------------------
@pytest.fixture(scope="module")
def music(loop):
    from bgm.v1 import music_pb2_grpc
    from services.music.servicer import MusicServicer
    from services.music.settings import MusicSettings

    running = start(loop, [MusicServicer(MusicSettings(backend="composer"), ServerSettings(max_duration_s=600))])
    yield music_pb2_grpc.MusicGeneratorStub(channel(running.address))
    loop.run(running.stop(0))


@pytest.mark.parametrize("rate, seconds, expected", [
    (96_000, 10, "above 48000 Hz"), (192_000, 10, "above 48000 Hz"), (48_000, 1800, "BGM_MUSIC_MAX_DURATION_S")])
def test_music_requests_that_cost_too_much_are_refused(music, rate, seconds, expected):
    request = music_pb2.GenerateRequest(
        spans=[common_pb2.EmotionSpan(emotion=common_pb2.EMOTION_JOY, span=common_pb2.TimeSpan(end_s=seconds))],
        format=audio_format(rate, 2))
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(music.Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in info.value.details()
    assert time.monotonic() - began < 2


# ----- settings, retries, temp files -----------------------------------------------------
def test_a_token_of_spaces_is_an_error_not_auth_off():
    with pytest.raises(SettingsError, match="BGM_STT_AUTH_TOKEN is only whitespace"):
        server_settings("stt", {"BGM_STT_AUTH_TOKEN": "   "})


def test_overloaded_carries_retry_info_a_client_reads():
    error = Overloaded("busy", retry_after_s=7.5)
    ((key, value),) = retry_trailers(error.code, error.message, error.retry_after_s)
    assert key == "grpc-status-details-bin" and read_retry_delay(value) == 7.5


def test_a_restart_within_the_retry_budget_is_survived(loop):
    """The service is down for 6 s; the default budget (30 s) rides it out, 1 s does not."""
    import asyncio

    from grpc import aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bgm.client import RetryPolicy, call_with_retry, make_channel
    from bgm.server import ModelServicer, start_server

    class Idle(ModelServicer):
        service_name = "bgm.v1.Idle"

        def add_to_server(self, server: aio.Server) -> None:
            pass

    async def scenario(budget_s: float) -> str:
        from tests.processes import free_port

        port = free_port()
        policy = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=1.0, budget_s=budget_s)

        async def later() -> object:
            await asyncio.sleep(6.0)
            return await start_server([Idle()], ServerSettings(port=port))

        starting = asyncio.ensure_future(later())
        async with make_channel(f"127.0.0.1:{port}", retry=policy) as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def check() -> str:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

            try:
                return await call_with_retry(check, policy, "health")
            except aio.AioRpcError as exc:
                return exc.code().name
            finally:
                running = await starting
                await running.stop(0)

    assert loop.run(scenario(30.0)) == "SERVING"
    assert loop.run(scenario(1.0)) == "UNAVAILABLE"


def test_startup_removes_what_dead_processes_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"bgm-mix-{dead_pid}-abc"
    stale.mkdir()
    (stale / "upload.mp4").write_bytes(b"x")
    (tmp_path / f"bgm-{dead_pid}-spool.wav").write_bytes(b"x")
    live = tmp_path / f"bgm-gw-{os.getppid()}-abc"
    live.mkdir()
    mine = tmp_path / f"{scratch.prefix('mix')}abc"
    mine.mkdir()
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    assert scratch.sweep(str(tmp_path)) == 2
    assert not stale.exists() and live.exists() and mine.exists() and other.exists()


# ----- the CLI's output files -------------------------------------------------------------
def bgm_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=60)


@pytest.mark.parametrize("extra, message", [
    (["--srt", "in.mp4"], "--srt in.mp4 would overwrite the input"),
    (["-o", "out.mp4", "--timeline", "out.mp4"], "--timeline and -o both name out.mp4"),
    (["-o", "folder"], "-o: folder is a folder"),
    (["--stems", "afile.txt"], "--stems: afile.txt is a file, not a folder"),
    (["-o", "afile.txt/out.mp4"], "is a file, not a folder"),
])
def test_cli_refuses_outputs_that_would_destroy_files_before_any_work(tmp_path, extra, message):
    (tmp_path / "in.mp4").write_bytes(b"precious")
    (tmp_path / "afile.txt").write_text("keep")
    (tmp_path / "folder").mkdir()
    began = time.monotonic()
    proc = bgm_cli("remix", "in.mp4", *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - began < 30  # refused before any model was loaded
    assert (tmp_path / "in.mp4").read_bytes() == b"precious" and (tmp_path / "afile.txt").read_text() == "keep"


def test_cli_writes_into_a_new_folder_and_leaves_no_partial_files(tmp_path):
    from gateway.cli import files as paths

    target = tmp_path / "new" / "deeper" / "out.srt"
    paths.check(tmp_path / "in.mp4", [paths.Output("--srt", target)])
    assert target.parent.is_dir()
    with pytest.raises(RuntimeError), paths.replacing(target) as f:
        f.write(b"half")
        raise RuntimeError("the job failed")
    assert list(target.parent.iterdir()) == []
    paths.write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole" and list(target.parent.iterdir()) == [target]
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


# ----- a server that cannot serve ends; a gateway reports what it can reach ----------------
def run_service(module: str, env: dict[str, str], timeout: float = 60
                ) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env})
    return proc, time.monotonic() - began


def test_a_model_that_cannot_load_ends_the_process_within_5_s_of_the_failure(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "BGM_EMOTION_PORT": "0",
           "BGM_EMOTION_BACKEND": "transformers", "BGM_EMOTION_MODEL": str(tmp_path / "no-such-model")}
    proc = subprocess.Popen([sys.executable, "-m", "services.emotion"], stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    lines, failed_at = [], None
    for line in proc.stderr:  # the JSON log, line by line as it is written
        lines.append(line)
        if failed_at is None and "model failed to load" in line:
            failed_at = time.monotonic()
    code = proc.wait(timeout=60)
    assert failed_at is not None, "".join(lines)
    assert code != 0 and time.monotonic() - failed_at < 5  # so restart policies and liveness act
    last = lines[-1].strip()
    assert last.startswith("bgm emotion: ") and "failed to load" in last, last


@pytest.mark.parametrize("env, message", [
    ({"BGM_STT_LOG_LEVEL": "LOUD"}, "BGM_STT_LOG_LEVEL: 'LOUD' is not one of DEBUG"),
    ({"BGM_STT_TLS_CERT": "/nonexistent.pem", "BGM_STT_TLS_KEY": "/nonexistent.key"},
     "BGM_STT_TLS_KEY: cannot read /nonexistent.key"),
])
def test_bad_server_settings_end_with_one_line(env, message):
    proc, _ = run_service("services.stt", {"BGM_STT_PORT": "0", **env})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("address", ["not a host:::", "host", "host:0", "host:99999", ":50051", "dns:///:1"])
def test_service_addresses_that_are_not_addresses_are_refused(address):
    from bgm import settings

    env = {f"BGM_GATEWAY_{n}_ADDRESS": "localhost:1" for n in ("STT", "EMOTION", "MUSIC", "MIXER")}
    env["BGM_GATEWAY_MUSIC_ADDRESS"] = address
    with pytest.raises(SettingsError, match="BGM_GATEWAY_MUSIC_ADDRESS"):
        settings.load(GatewaySettings, "BGM_GATEWAY", env)
    env["BGM_GATEWAY_MUSIC_ADDRESS"] = "dns:///music.bgm.svc:50053"
    settings.load(GatewaySettings, "BGM_GATEWAY", env)


def test_the_gateway_is_not_serving_while_a_service_is_down_and_recovers(loop):
    """Four stand-in services that only answer health checks: the gateway's readiness must
    follow them down and back up by itself, and a call meanwhile names what is missing."""
    from bgm import vocab
    from bgm.server import ModelServicer
    from tests.conftest import health_status
    from tests.processes import free_port

    class Standin(ModelServicer):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.service_name = name

        def add_to_server(self, server) -> None:
            pass

    port = free_port()

    def services():
        return start(loop, [Standin(s.grpc_name) for s in vocab.BACKEND_SERVICES], port=port)

    def wait_for(ch, status: str, within: float) -> float:
        began = time.monotonic()
        while time.monotonic() - began < within:
            if health_status(ch, "bgm.v1.Gateway") == status:
                return time.monotonic() - began
            time.sleep(0.2)
        raise AssertionError(f"gateway not {status} after {within} s")

    backends = services()
    address = f"127.0.0.1:{port}"
    gateway = GatewayServicer(GatewaySettings(stt_address=address, emotion_address=address,
                                              music_address=address, mixer_address=address), ServerSettings())
    running = start(loop, [gateway])
    try:
        ch = channel(running.address)
        assert health_status(ch, "bgm.v1.Gateway") == "SERVING"
        loop.run(backends.stop(0))
        wait_for(ch, "NOT_SERVING", 10)
        with pytest.raises(grpc.RpcError) as info:
            list(gateway_pb2_grpc.GatewayStub(ch).Remix(iter(upload("x.mp4", b"x")), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot reach every service" in info.value.details() and "stt: unreachable" in info.value.details()
        assert health_status(ch, "") == "SERVING"  # alive, only not ready
        backends = services()
        wait_for(ch, "SERVING", 15)
        # A stale verdict (a watch check that ran out its deadline while the process was
        # busy) is looked at again before a job is refused: this one goes on to the upload.
        gateway.ready, gateway.down = False, {"stt": "unreachable"}
        with pytest.raises(grpc.RpcError) as info:
            list(gateway_pb2_grpc.GatewayStub(ch).Remix(iter(upload("x.mp4", b"x")), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert gateway.ready and health_status(ch, "bgm.v1.Gateway") == "SERVING"
    finally:
        loop.run(running.stop(0))
        loop.run(backends.stop(0))


# ----- cancelling stops the work ----------------------------------------------------------
def child_processes(names: tuple[str, ...]) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.split()[-1] in names]


def test_a_request_that_ends_kills_its_child_processes(loop):
    import asyncio

    from bgm import processes

    async def job() -> None:
        with processes.owned_by_request():
            await asyncio.to_thread(processes.run, ["sleep", "30"], 60)

    async def cancel_midway() -> float:
        task = asyncio.ensure_future(job())
        await asyncio.sleep(0.5)
        assert child_processes(("sleep",))
        began = time.monotonic()
        task.cancel()
        while child_processes(("sleep",)):
            await asyncio.sleep(0.05)
        return time.monotonic() - began

    assert loop.run(cancel_midway()) < 1.0


def threads_running(module: str) -> int:
    """How many threads are executing code of ``module`` (a path fragment) right now."""
    import traceback

    return sum(any(module in f.f_code.co_filename for f, _ in traceback.walk_stack(frame))
               for frame in sys._current_frames().values())


def test_cancelling_a_remix_stops_the_music_renderer(gateway, tmp_path):
    """The composer renders 50 s of music with FluidSynth in-process for about a second; a
    client that cancels meanwhile must not leave it running (no kill reaches a thread: the
    render checks its request, ``bgm.processes.check_request``)."""
    stub, running = gateway
    clip = audio_mkv(tmp_path / "clip.mkv", 50)
    call = stub.Remix(iter(upload("clip.mkv", clip.read_bytes())), timeout=120)
    for event in call:
        if event.WhichOneof("event") == "progress" and event.progress.stage == common_pb2.STAGE_GENERATE_MUSIC:
            break
    deadline = time.monotonic() + 10
    while not threads_running("services/music/synth.py") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads_running("services/music/synth.py"), "the renderer never started"
    call.cancel()
    began = time.monotonic()
    while (threads_running("services/music/synth.py") or child_processes(("ffmpeg",))) \
            and time.monotonic() - began < 5:
        time.sleep(0.02)
    assert not threads_running("services/music/synth.py") and not child_processes(("ffmpeg",))
    assert time.monotonic() - began < 1.0
    deadline = time.monotonic() + 10
    while running.servicers[0].limiter.active and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running.servicers[0].limiter.active == 0


def test_a_render_stops_when_its_request_ends():
    """Without the check, the render runs to its end whatever happened to the request."""
    from bgm import processes
    from services.music.composer import synthesizer

    with processes.owned_by_request() as children:
        children.kill_all()  # what the end of a request does
        with pytest.raises(processes.RequestEnded):
            synthesizer().render(b"MThd", 48_000 * 30, 48_000)


def test_a_full_disk_is_named_not_internal():
    import errno

    from bgm.errors import _status_for

    code, message = _status_for(OSError(errno.ENOSPC, "No space left on device"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in message


def test_a_refusal_in_the_middle_of_an_upload_reaches_the_client_as_itself(gateway, loop):
    """grpc's asyncio client reported 67 of 100 refusals of an oversize upload as "INTERNAL:
    Internal error from Core" (the refusal overtook a write; grpc/grpc#36066): the server now
    drops what the caller is still sending before it refuses."""
    _, running = gateway
    servicer = running.servicers[0]
    original = servicer.settings
    servicer.settings = replace(original, max_upload_bytes=2**20)

    try:
        assert loop.run(upload_status_counts(running.address, 60, pieces=8)) == {"INVALID_ARGUMENT": 60}
    finally:
        servicer.settings = original
