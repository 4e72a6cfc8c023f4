"""The shared runtime: settings, chunking, error mapping, overload, retries."""

from __future__ import annotations

import asyncio
import threading
from typing import ClassVar

import grpc
import pytest
from grpc import aio

from bgm import settings
from bgm.chunks import CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, Spool, iter_chunks
from bgm.client import RetryPolicy, call_with_retry, make_channel
from bgm.errors import ConcurrencyLimiter, InvalidInput, NotReady, Overloaded, Unsupported
from bgm.server import ModelServicer
from bgm.settings import ServerSettings, SettingsError
from bgm.v1 import common_pb2, emotion_pb2, emotion_pb2_grpc, music_pb2, music_pb2_grpc
from tests.conftest import channel, start

# ----- settings ----------------------------------------------------------------------


def test_settings_read_from_environment():
    env = {"BGM_STT_PORT": "50051", "BGM_STT_MAX_CONCURRENCY": "3", "BGM_STT_LOG_LEVEL": "debug"}
    s = settings.server_settings("stt", env)
    assert (s.port, s.max_concurrency, s.log_level) == (50051, 3, "debug")
    assert settings.server_settings("stt", {}).port == 0


@pytest.mark.parametrize(("env", "fragment"), [
    ({"BGM_STT_PORT": "http"}, "BGM_STT_PORT='http' is not an integer"),
    ({"BGM_STT_PORT": "70000"}, "BGM_STT_PORT: 70000 is not a TCP port"),
    ({"BGM_STT_MAX_CONCURRENCY": "0"}, "BGM_STT_MAX_CONCURRENCY: must be at least 1"),
    ({"BGM_STT_GRACE_S": "soon"}, "BGM_STT_GRACE_S='soon' is not a number"),
])
def test_bad_settings_are_named_in_the_error(env, fragment):
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        settings.server_settings("stt", env)


def test_boolean_settings():
    from services.stt.settings import SttSettings

    assert settings.load(SttSettings, "BGM_STT", {"BGM_STT_VAD_FILTER": "off"}).vad_filter is False
    with pytest.raises(SettingsError, match="not a boolean"):
        settings.load(SttSettings, "BGM_STT", {"BGM_STT_VAD_FILTER": "maybe"})


# ----- chunking ----------------------------------------------------------------------


def test_chunks_are_within_limits_and_reassemble():
    assert MIN_CHUNK_BYTES <= CHUNK_BYTES <= MAX_CHUNK_BYTES
    data = bytes(range(256)) * 10_000  # 2.56 MB
    pieces = list(iter_chunks(data))
    assert all(len(p) <= CHUNK_BYTES for p in pieces)
    assert b"".join(pieces) == data


def test_spool_enforces_limit_and_cleans_up(tmp_path):
    with Spool(limit=10, dir=str(tmp_path)) as spool:
        spool.write(b"12345")
        with pytest.raises(InvalidInput, match="larger than the limit"):
            spool.write(b"123456")
        path = spool.path
        assert path.exists()
    assert not path.exists()


# ----- error mapping -----------------------------------------------------------------


class Faulty(ModelServicer, emotion_pb2_grpc.EmotionClassifierServicer, music_pb2_grpc.MusicGeneratorServicer):
    """A servicer that raises what its request asks for, to see how each reaches a client."""

    service_name = "bgm.v1.EmotionClassifier"
    errors: ClassVar[dict[str, Exception]] = {
        "invalid": InvalidInput("segment 3: end is before start"),
        "not_ready": NotReady("model still loading"),
        "overloaded": Overloaded("too busy", retry_after_s=2),
        "unsupported": Unsupported("no such backend here"),
        "bug": KeyError("secret internal detail"),
    }

    def __init__(self) -> None:
        super().__init__()
        self.unavailable_left = 0
        self.calls = 0
        self.limiter = ConcurrencyLimiter(1, "the faulty service")
        self.gate = threading.Event()

    def add_to_server(self, server: aio.Server) -> None:
        emotion_pb2_grpc.add_EmotionClassifierServicer_to_server(self, server)
        music_pb2_grpc.add_MusicGeneratorServicer_to_server(self, server)

    async def Classify(self, request, context):
        self.calls += 1
        if self.unavailable_left > 0:
            self.unavailable_left -= 1
            raise NotReady("warming up")
        what = request.segments[0].text if request.segments else ""
        if what == "slow":
            with self.limiter:
                await asyncio.to_thread(self.gate.wait, 10)
        elif what in self.errors:
            raise self.errors[what]
        return emotion_pb2.ClassifyResponse(backend="faulty")

    async def Generate(self, request, context):
        yield music_pb2.GenerateResponse(header=music_pb2.MusicHeader(backend="faulty"))
        raise self.errors[request.style.backend]


@pytest.fixture(scope="module")
def faulty(loop):
    servicer = Faulty()
    running = start(loop, [servicer])
    yield servicer, running
    loop.run(running.stop(0))


def _classify(address: str, text: str) -> grpc.RpcError:
    stub = emotion_pb2_grpc.EmotionClassifierStub(channel(address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(emotion_pb2.ClassifyRequest(segments=[emotion_pb2.TextSegment(text=text)]), timeout=10)
    return info.value


@pytest.mark.parametrize(("kind", "code", "message"), [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "segment 3: end is before start"),
    ("not_ready", grpc.StatusCode.UNAVAILABLE, "model still loading"),
    ("overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, "too busy; retry after 2 s"),
    ("unsupported", grpc.StatusCode.FAILED_PRECONDITION, "no such backend here"),
])
def test_service_errors_map_to_status_codes(faulty, kind, code, message):
    error = _classify(faulty[1].address, kind)
    assert error.code() == code
    assert error.details() == message


def test_unexpected_exception_is_internal_without_traceback(faulty):
    error = _classify(faulty[1].address, "bug")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details().startswith("internal error (KeyError); request id ")
    assert "secret internal detail" not in error.details()
    assert "Traceback" not in error.details()


@pytest.mark.parametrize("kind", ["invalid", "bug"])
def test_errors_in_streaming_handlers_are_mapped_too(faulty, kind):
    stub = music_pb2_grpc.MusicGeneratorStub(channel(faulty[1].address))
    responses = stub.Generate(music_pb2.GenerateRequest(style=music_pb2.MusicStyle(backend=kind)), timeout=10)
    first = next(responses)
    assert first.header.backend == "faulty"
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    expected = grpc.StatusCode.INVALID_ARGUMENT if kind == "invalid" else grpc.StatusCode.INTERNAL
    assert info.value.code() == expected


def test_request_id_from_metadata_is_used(faulty):
    stub = emotion_pb2_grpc.EmotionClassifierStub(channel(faulty[1].address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(emotion_pb2.ClassifyRequest(segments=[emotion_pb2.TextSegment(text="bug")]),
                      metadata=[("x-request-id", "req-42")], timeout=10)
    assert info.value.details().endswith("request id req-42")


def test_overload_is_refused_with_resource_exhausted_and_service_keeps_serving(faulty):
    servicer, running = faulty
    stub = emotion_pb2_grpc.EmotionClassifierStub(channel(running.address))
    slow = stub.Classify.future(emotion_pb2.ClassifyRequest(segments=[emotion_pb2.TextSegment(text="slow")]),
                                timeout=20)
    try:
        for _ in range(100):  # wait until the slow call holds the only slot
            if servicer.limiter.active:
                break
            threading.Event().wait(0.05)
        error = _classify(running.address, "slow")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after" in error.details()
    finally:
        servicer.gate.set()
    assert slow.result().backend == "faulty"
    servicer.gate.clear()


def test_client_retries_unavailable_only(faulty, loop):
    servicer, running = faulty
    # The budget leaves room for slow calls on a loaded machine (0.15 s once allowed only two).
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, budget_s=0.6)

    async def attempt_with(text: str, unavailable: int) -> tuple[object, int]:
        servicer.unavailable_left, servicer.calls = unavailable, 0
        async with make_channel(running.address, retry=RetryPolicy(max_attempts=1)) as ch:
            stub = emotion_pb2_grpc.EmotionClassifierStub(ch)
            req = emotion_pb2.ClassifyRequest(segments=[emotion_pb2.TextSegment(text=text)])
            try:
                reply = await call_with_retry(lambda: stub.Classify(req, timeout=5), policy, "classify")
                return reply.backend, servicer.calls
            except aio.AioRpcError as exc:
                return exc.code(), servicer.calls

    assert loop.run(attempt_with("ok", unavailable=2)) == ("faulty", 3)
    # Retried until the time budget is spent (backoffs 0.01, 0.02, 0.04, 0.05 ... s: at most
    # 14 calls in 0.6 s), then given up.
    code, calls = loop.run(attempt_with("ok", unavailable=99))
    assert code == grpc.StatusCode.UNAVAILABLE and 3 <= calls <= 14
    assert loop.run(attempt_with("invalid", unavailable=0)) == (grpc.StatusCode.INVALID_ARGUMENT, 1)


def test_channel_retry_policy_covers_unavailable(faulty, loop):
    servicer, running = faulty

    async def go() -> tuple[str, int]:
        servicer.unavailable_left, servicer.calls = 2, 0
        async with make_channel(running.address, retry=RetryPolicy(initial_backoff_s=0.01)) as ch:
            reply = await emotion_pb2_grpc.EmotionClassifierStub(ch).Classify(
                emotion_pb2.ClassifyRequest(segments=[emotion_pb2.TextSegment(text="ok")]), timeout=10)
        return reply.backend, servicer.calls

    assert loop.run(go()) == ("faulty", 3)


def test_emotion_enum_order_is_the_products():
    names = [common_pb2.Emotion.Name(v) for v in range(1, 8)]
    assert names == ["EMOTION_JOY", "EMOTION_SADNESS", "EMOTION_DISGUST", "EMOTION_ANGER",
                     "EMOTION_SURPRISE", "EMOTION_FEAR", "EMOTION_NEUTRAL"]


def test_server_settings_defaults_are_sane():
    s = ServerSettings()
    assert s.max_message_bytes >= 2 * MAX_CHUNK_BYTES


def test_a_lost_connection_reported_as_internal_is_retried_but_a_server_internal_is_not():
    from grpc.aio import Metadata

    from bgm.client import transient

    def error(code: grpc.StatusCode, details: str) -> aio.AioRpcError:
        return aio.AioRpcError(code, Metadata(), Metadata(), details=details)

    assert transient(error(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert transient(error(grpc.StatusCode.INTERNAL, "Internal error from Core"))  # grpc/grpc#36066
    assert not transient(error(grpc.StatusCode.INTERNAL, "internal error (KeyError); request id 1f2e"))
    assert not transient(error(grpc.StatusCode.INVALID_ARGUMENT, "bad sample rate"))


def test_pcm_in_another_format_converts_to_float_stereo_at_the_mixer_rate():
    import numpy as np

    from bgm import audio
    from bgm.errors import InvalidInput

    rate_in, seconds = 22_050, 2.0
    t = np.arange(int(rate_in * seconds)) / rate_in
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None]
    source = audio.audio_format(rate_in, 1, audio.PCM_S16LE)
    out = audio.pcm_to_float(audio.convert_pcm(audio.float_to_pcm(tone, audio.PCM_S16LE), source, 48_000, 2),
                             audio.audio_format(48_000, 2))
    assert out.shape == (96_000, 2) and np.array_equal(out[:, 0], out[:, 1])
    spectrum = np.abs(np.fft.rfft(out[:, 0]))
    assert abs(np.argmax(spectrum) * 48_000 / out.shape[0] - 440) < 1.0
    assert abs(np.sqrt((out[1000:-1000, 0] ** 2).mean()) - 0.5 / np.sqrt(2)) < 0.01
    with pytest.raises(InvalidInput, match="expected raw PCM"):
        audio.convert_pcm(b"RIFF", audio.audio_format(48_000, 2, audio.CONTAINER), 48_000, 2)


@pytest.mark.parametrize("encoding", ["s16", "f32"])
def test_a_pcm_file_read_in_pieces_equals_the_whole_converted_at_once(tmp_path, encoding):
    """The mixer reads long tracks a few MB at a time (never holding the bytes and the floats);
    pieces that do not line up with frames must not shift a sample."""
    import numpy as np

    from bgm import audio
    from bgm.errors import InvalidInput

    kind = audio.PCM_S16LE if encoding == "s16" else audio.PCM_F32LE
    fmt = audio.audio_format(48_000, 2, kind)
    frames = np.random.default_rng(0).uniform(-0.9, 0.9, (100_003, 2)).astype(np.float32)
    path = tmp_path / "track.pcm"
    path.write_bytes(audio.float_to_pcm(frames, kind))
    whole = audio.pcm_to_float(path.read_bytes(), fmt)
    for piece_bytes in (4 * 2**20, 1000, 4099):
        assert np.array_equal(audio.pcm_file_to_float(path, fmt, piece_bytes), whole)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(InvalidInput, match="not a whole number"):
        audio.pcm_file_to_float(path, fmt)
