"""Every server in-process on port 0: health before and after loading, reflection, the
50 MiB stream, and each service as its own process with a graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from bgm.settings import ServerSettings
from bgm.v1 import (
    common_pb2,
    emotion_pb2,
    emotion_pb2_grpc,
    gateway_pb2_grpc,
    mixer_pb2_grpc,
    music_pb2,
    music_pb2_grpc,
    stt_pb2,
    stt_pb2_grpc,
)
from tests.conftest import channel, health_status, start
from tests.processes import free_port


def _servicer(name: str):
    if name == "stt":
        from services.stt.servicer import SpeechToTextServicer
        from services.stt.settings import SttSettings

        return SpeechToTextServicer(SttSettings(), ServerSettings())
    if name == "emotion":
        from services.emotion.servicer import EmotionServicer
        from services.emotion.settings import EmotionSettings

        return EmotionServicer(EmotionSettings(), ServerSettings())
    if name == "music":
        from services.music.servicer import MusicServicer
        from services.music.settings import MusicSettings

        return MusicServicer(MusicSettings(), ServerSettings())
    if name == "mixer":
        from services.mixer.servicer import MixerServicer
        from services.mixer.settings import MixerSettings

        return MixerServicer(MixerSettings(), ServerSettings())
    from gateway.servicer import GatewayServicer
    from gateway.settings import GatewaySettings
    from services.embedded import EmbeddedServices

    return GatewayServicer(GatewaySettings(), ServerSettings(), EmbeddedServices())


def _probe_call(name: str, ch: grpc.Channel) -> None:
    """One real RPC to the service (raises grpc.RpcError on failure)."""
    if name == "stt":
        list(stt_pb2_grpc.SpeechToTextStub(ch).Transcribe(iter([stt_pb2.TranscribeRequest(
            config=stt_pb2.TranscribeConfig(format=common_pb2.AudioFormat(
                sample_rate_hz=16000, channels=1, encoding=common_pb2.ENCODING_PCM_S16LE))),
            stt_pb2.TranscribeRequest(audio=b"\0\0" * 16000)]), timeout=30))
    elif name == "emotion":
        emotion_pb2_grpc.EmotionClassifierStub(ch).Classify(emotion_pb2.ClassifyRequest(duration_s=3), timeout=30)
    elif name == "music":
        list(music_pb2_grpc.MusicGeneratorStub(ch).Generate(music_pb2.GenerateRequest(spans=[common_pb2.EmotionSpan(
            emotion=common_pb2.EMOTION_JOY, span=common_pb2.TimeSpan(start_s=0, end_s=2))]), timeout=30))
    elif name == "mixer":
        list(mixer_pb2_grpc.MixerStub(ch).Separate(iter([]), timeout=30))
    else:
        list(gateway_pb2_grpc.GatewayStub(ch).Analyze(iter([]), timeout=30))


SERVICES = {
    "stt": "bgm.v1.SpeechToText",
    "emotion": "bgm.v1.EmotionClassifier",
    "music": "bgm.v1.MusicGenerator",
    "mixer": "bgm.v1.Mixer",
    "gateway": "bgm.v1.Gateway",
}


@pytest.mark.parametrize("name", list(SERVICES))
def test_health_reflection_and_readiness(loop, name):
    full_name = SERVICES[name]
    running = start(loop, [_servicer(name)], wait=False)
    try:
        assert running.port > 0
        ch = channel(running.address)
        # The process is alive at once, but the service is not ready until its model loads.
        assert health_status(ch, "") == "SERVING"
        assert health_status(ch, full_name) == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            _probe_call(name, ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "still loading" in info.value.details() or "cannot reach every service yet" in info.value.details()

        loop.run(_start_and_wait(running))
        assert health_status(ch, full_name) == "SERVING"
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {full_name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        # A real call now gets past readiness: either an answer or a input error, never UNAVAILABLE.
        try:
            _probe_call(name, ch)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    finally:
        loop.run(running.stop(0))


async def _start_and_wait(running) -> None:
    running.start_loading()
    await running.wait_ready(600)


def test_a_50_mib_stream_crosses_the_stt_service_in_chunks(stt_server):
    """273 s of 48 kHz stereo noise at a whisper: 50 MiB streamed in 512 KiB chunks."""
    rate, channels = 48_000, 2
    total_bytes = 50 * 2**20
    frames = total_bytes // (2 * channels)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal((frames, channels)) * 30).astype("<i2").tobytes()
    assert len(noise) >= 50 * 2**20
    sent = []

    def requests():
        yield stt_pb2.TranscribeRequest(config=stt_pb2.TranscribeConfig(format=common_pb2.AudioFormat(
            sample_rate_hz=rate, channels=channels, encoding=common_pb2.ENCODING_PCM_S16LE)))
        from bgm.chunks import iter_chunks

        for piece in iter_chunks(noise):
            sent.append(len(piece))
            yield stt_pb2.TranscribeRequest(audio=piece)

    events = list(stt_pb2_grpc.SpeechToTextStub(channel(stt_server.address)).Transcribe(requests(), timeout=300))
    summary = events[-1].summary
    assert len(sent) == 100 and max(sent) == 512 * 1024
    assert summary.duration_s == pytest.approx(frames / rate, abs=0.01)
    assert summary.segment_count == 0  # noise is not speech


def test_oversized_message_is_refused_by_the_limit(stt_server):
    ch = grpc.insecure_channel(stt_server.address, options=[("grpc.max_send_message_length", 16 * 2**20)])
    with pytest.raises(grpc.RpcError) as info:
        list(stt_pb2_grpc.SpeechToTextStub(ch).Transcribe(iter([
            stt_pb2.TranscribeRequest(audio=b"x" * (8 * 2**20))]), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health_status(channel(stt_server.address), "bgm.v1.SpeechToText") == "SERVING"


@pytest.mark.parametrize(("module", "service"), [("services.music", "music"), ("services.emotion", "emotion")])
def test_service_runs_as_its_own_process_and_stops_gracefully(module, service, tmp_path):
    port = free_port()
    env = {**os.environ, f"BGM_{service.upper()}_PORT": str(port), f"BGM_{service.upper()}_GRACE_S": "2"}
    log_path = tmp_path / "service.log"
    # Logs go to a file, not a pipe: an unread pipe can fill up and stall the service.
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stderr=log_file)
        try:
            ch = channel(f"127.0.0.1:{port}")
            deadline = time.monotonic() + 120
            status = "none"
            while time.monotonic() < deadline and status != "SERVING":
                try:
                    status = health_status(ch, SERVICES[service])
                except grpc.RpcError:
                    time.sleep(0.2)
            assert status == "SERVING", log_path.read_text()[-2000:]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert '"msg": "shutting down"' in log_path.read_text()


def test_bad_setting_stops_the_process_with_a_clear_message():
    env = {**os.environ, "BGM_MUSIC_PORT": "eighty"}
    proc = subprocess.run([sys.executable, "-m", "services.music"], env=env, capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert "BGM_MUSIC_PORT='eighty' is not an integer" in proc.stderr.decode()
