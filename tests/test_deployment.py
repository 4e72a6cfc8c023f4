"""Each service as its own process on its own loopback port, as a deployment runs them."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from bgm.v1 import gateway_pb2_grpc
from gateway.example import make_example
from tests.conftest import channel
from tests.media_files import video_packet_hashes
from tests.processes import spawn_all
from tests.test_gateway import requests, run, section_emotions


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deployed")
    procs = spawn_all(workdir)
    yield procs, workdir
    for proc in procs.values():
        proc.stop()


def test_separate_processes_give_the_same_result_as_embedded(deployed, loop, tmp_path):
    procs, _ = deployed
    example = make_example(tmp_path / "example.mp4")
    stub = gateway_pb2_grpc.GatewayStub(channel(procs["gateway"].address))
    apart = run(stub.Remix(requests(example), timeout=600))

    from bgm.settings import ServerSettings
    from gateway.servicer import GatewayServicer
    from gateway.settings import GatewaySettings
    from tests.conftest import start

    running = start(loop, [GatewayServicer(GatewaySettings(), ServerSettings())])
    try:
        together = run(gateway_pb2_grpc.GatewayStub(channel(running.address)).Remix(requests(example), timeout=600))
    finally:
        loop.run(running.stop(1))

    assert [s.text for s in apart["transcript"].segments] == [s.text for s in together["transcript"].segments]
    assert list(apart["timeline"].spans) == list(together["timeline"].spans)
    assert section_emotions(apart["timeline"], 3, 10.0) == section_emotions(together["timeline"], 3, 10.0)
    out_apart, out_together = tmp_path / "apart.mp4", tmp_path / "together.mp4"
    out_apart.write_bytes(b"".join(apart["video"]))
    out_together.write_bytes(b"".join(together["video"]))
    assert video_packet_hashes(out_apart) == video_packet_hashes(out_together) == video_packet_hashes(example)
    assert b"".join(apart["video"]) == b"".join(together["video"])  # the same seed: the very same file


def test_killing_the_music_service_mid_run_is_a_clear_unavailable(deployed, tmp_path):
    procs, _ = deployed
    example = make_example(tmp_path / "example.mp4")
    stub = gateway_pb2_grpc.GatewayStub(channel(procs["gateway"].address))
    call = stub.Remix(requests(example), timeout=600)
    errors: list[grpc.RpcError] = []
    transcript_seen = threading.Event()

    def consume() -> None:
        try:
            for event in call:
                if event.WhichOneof("event") == "transcript":
                    transcript_seen.set()
        except grpc.RpcError as exc:
            errors.append(exc)

    worker = threading.Thread(target=consume)
    worker.start()
    assert transcript_seen.wait(300)
    procs["music"].popen.kill()
    started = time.monotonic()
    worker.join(120)
    assert not worker.is_alive(), "the gateway hung after the music service died"
    assert errors, "the remix should fail without its music service"
    error = errors[0]
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "GENERATE_MUSIC" in error.details()
    print(f"\nfailed after {time.monotonic() - started:.1f} s with: {error.details()}")
