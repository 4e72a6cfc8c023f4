"""Each service as its own process on its own loopback port, as a deployment runs them."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from bgm.v1 import common_pb2, gateway_pb2_grpc
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
    from services.embedded import EmbeddedServices
    from tests.conftest import start

    running = start(loop, [GatewayServicer(GatewaySettings(), ServerSettings(), EmbeddedServices())])
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
    assert "GENERATE_MUSIC" in error.details() and "the music service is unavailable" in error.details()
    print(f"\nfailed after {time.monotonic() - started:.1f} s with: {error.details()}")


def test_a_service_killed_and_restarted_mid_job_is_retried_to_success(deployed, tmp_path):
    import sys

    from tests.processes import spawn

    procs, workdir = deployed
    for name in ("stt", "emotion", "music", "mixer"):  # an earlier test may have killed one
        if procs[name].popen.poll() is not None:
            procs[name] = spawn(name, [sys.executable, "-m", f"services.{name}"], {}, workdir / f"re-{name}",
                                port=procs[name].port)
            procs[name].wait_serving()
    stt = procs["stt"]
    # A gateway of its own with a longer retry budget (backoff 0.5, 1, 2, 4, 5, 5 s).
    env = {f"BGM_GATEWAY_{name.upper()}_ADDRESS": procs[name].address for name in ("stt", "emotion", "music", "mixer")}
    env["BGM_GATEWAY_RETRY_ATTEMPTS"] = "7"
    patient = spawn("gateway", [sys.executable, "-m", "gateway"], env, workdir / "patient")
    patient.wait_serving()
    try:
        example = make_example(tmp_path / "example.mp4", section_s=3)
        stt.popen.kill()
        stt.popen.wait(10)
        results: list[object] = []

        def job() -> None:
            try:
                results.append(run(gateway_pb2_grpc.GatewayStub(channel(patient.address)).Analyze(
                    requests(example), timeout=300)))
            except grpc.RpcError as exc:
                results.append(exc)

        worker = threading.Thread(target=job)
        worker.start()
        time.sleep(1.0)  # the job is now retrying the TRANSCRIBE stage
        restarted = spawn("stt", [sys.executable, "-m", "services.stt"], {}, workdir / "restarted", port=stt.port)
        procs["stt"] = restarted
        restarted.wait_serving()
        worker.join(120)
        assert not worker.is_alive(), "the job hung"
        assert isinstance(results[0], dict), results[0]
        assert results[0]["transcript"].segments and results[0]["timeline"].spans
    finally:
        patient.stop()


def test_the_mixer_killed_while_separating_is_retried_and_the_result_is_unchanged(deployed, tmp_path):
    """Separation and the mix stream into each other; both are replayed after a restart,
    and the file is the very one an undisturbed run gives (no speech lost or doubled)."""
    import sys

    from tests.processes import spawn

    procs, workdir = deployed
    for name in ("stt", "emotion", "music", "mixer"):  # an earlier test may have killed one
        if procs[name].popen.poll() is not None:
            procs[name] = spawn(name, [sys.executable, "-m", f"services.{name}"], {}, workdir / f"re2-{name}",
                                port=procs[name].port)
            procs[name].wait_serving()
    env = {f"BGM_GATEWAY_{name.upper()}_ADDRESS": procs[name].address for name in ("stt", "emotion", "music", "mixer")}
    env["BGM_GATEWAY_RETRY_ATTEMPTS"] = "7"
    patient = spawn("gateway", [sys.executable, "-m", "gateway"], env, workdir / "patient-mixer")
    patient.wait_serving()
    try:
        example = make_example(tmp_path / "example.mp4", section_s=6)
        stub = gateway_pb2_grpc.GatewayStub(channel(patient.address))
        undisturbed = run(stub.Remix(requests(example), timeout=300))

        mixer = procs["mixer"]
        separating = threading.Event()
        outcome: list[object] = []

        def job() -> None:
            try:
                events = []
                for event in stub.Remix(requests(example), timeout=300):
                    events.append(event)
                    p = event.progress
                    in_separation = p.stage == common_pb2.STAGE_SEPARATE and 0 < p.fraction < 1
                    if event.WhichOneof("event") == "progress" and in_separation:
                        separating.set()
                outcome.append(events)
            except grpc.RpcError as exc:
                outcome.append(exc)

        worker = threading.Thread(target=job)
        worker.start()
        assert separating.wait(120), "no separation progress seen"
        mixer.popen.kill()
        mixer.popen.wait(10)
        restarted = spawn("mixer", [sys.executable, "-m", "services.mixer"], {}, workdir / "mixer-restarted",
                          port=mixer.port)
        procs["mixer"] = restarted
        restarted.wait_serving()
        worker.join(180)
        assert not worker.is_alive(), "the job hung"
        assert isinstance(outcome[0], list), outcome[0]
        video = b"".join(e.video for e in outcome[0] if e.WhichOneof("event") == "video")
        assert video == b"".join(undisturbed["video"])
    finally:
        patient.stop()
