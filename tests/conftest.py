"""Shared test fixtures: servers run on an asyncio loop in a background thread and are
reached with ordinary (sync) gRPC clients over loopback, as any caller would."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from tests.asyncio_guard import SLOW, guard

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Each test session gets its own temporary folder (services started as processes inherit it
# through TMPDIR), so the checks for leftover files see this session's files only.
import tempfile

_SESSION_TMP = tempfile.mkdtemp(prefix="pytest-session-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = _SESSION_TMP

T = TypeVar("T")


@pytest.fixture(autouse=True)
def loop_never_blocked() -> Iterator[None]:
    """Fails the test during which any guarded loop held a callback too long (tests/asyncio_guard.py)."""
    SLOW.take()
    yield
    reports = SLOW.take()
    if reports:
        pytest.fail("the event loop was blocked (an async def must only await; move the work to a thread):\n"
                    + "\n".join(reports[:5]), pytrace=False)


class LoopThread:
    def __init__(self) -> None:
        self.loop = guard(asyncio.new_event_loop())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def start(loop: LoopThread, servicers: Sequence[Any], wait: bool = True, **settings: Any) -> Any:
    from bgm.server import start_server
    from bgm.settings import ServerSettings

    cfg = ServerSettings(**settings)

    async def go() -> Any:
        running = await start_server(servicers, cfg, load_models=wait)
        if wait:
            await running.wait_ready(600)
        return running

    return loop.run(go())


def channel(address: str) -> grpc.Channel:
    mib = 2**20
    return grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 4 * mib),
                                                   ("grpc.max_send_message_length", 4 * mib)])


def health_status(ch: grpc.Channel, service: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def speak(text: str, path: Path, voice: str = "en-us", speed: int = 150) -> Path:
    assert shutil.which("espeak-ng"), "espeak-ng is required (scripts/setup.sh installs it)"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    return path


def bgm_temp_files() -> set[str]:
    """The service-made temporary files and folders of this test session."""
    return {p.name for p in Path(_SESSION_TMP).glob("bgm-*")}


@pytest.fixture(scope="session")
def stt_server(loop: LoopThread) -> Iterator[Any]:
    from bgm.settings import ServerSettings
    from services.stt.servicer import SpeechToTextServicer
    from services.stt.settings import SttSettings

    running = start(loop, [SpeechToTextServicer(SttSettings(), ServerSettings(max_concurrency=2))])
    yield running
    loop.run(running.stop(1))


async def upload_status_counts(address: str, n: int, method: str = "Remix", pieces: int = 0,
                               timeout: float = 60) -> dict[str, int]:
    """``n`` calls of the gateway's ``method``, each on a fresh connection (as each CLI run),
    uploading as the CLI does: the options, the first answer awaited, then ``pieces`` video
    pieces of 512 KiB. How many ended with each status code."""
    from grpc import aio

    from bgm.v1 import gateway_pb2, gateway_pb2_grpc

    async def upload(answered: asyncio.Event):
        yield gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename="upload.mp4"))
        await answered.wait()
        for _ in range(pieces):
            yield gateway_pb2.RemixRequest(video=bytes(512 * 1024))

    codes: dict[str, int] = {}
    for _ in range(n):
        answered = asyncio.Event()
        async with aio.insecure_channel(address) as fresh:
            call = getattr(gateway_pb2_grpc.GatewayStub(fresh), method)
            try:
                async for _ in call(upload(answered), timeout=timeout):
                    answered.set()
                code = "OK"
            except aio.AioRpcError as exc:
                code = exc.code().name
        codes[code] = codes.get(code, 0) + 1
    return codes
