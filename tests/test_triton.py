"""The Triton path: the model repository's model.py, and the music service's triton backend
against a server speaking Triton's gRPC protocol that hosts that model.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("tritonclient")

from bgm.settings import ServerSettings
from bgm.v1 import music_pb2, music_pb2_grpc
from services.music.servicer import MusicServicer
from services.music.settings import MusicSettings
from tests import triton_server
from tests.conftest import channel, start
from tests.test_music import timeline
from tests.tiny_models import tiny_stable_diffusion

RATE = 44_100


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def model(pipeline):
    return triton_server.load_model(pipeline)


@pytest.fixture(scope="module")
def instances(pipeline, model):
    """As many model.py instances as the shipped config.pbtxt asks Triton for."""
    count = triton_server.shipped_config().instances
    assert count >= 2  # clips of a video render in parallel
    return [model] + [triton_server.load_model(pipeline) for _ in range(count - 1)]


def request(pb_utils, **overrides):
    values = {
        "IMAGE": np.full((512, 512, 3), 200, dtype=np.uint8),
        "PROMPT_FROM": np.array([b"happy piano"], dtype=object), "PROMPT_TO": np.array([b"sad strings"], dtype=object),
        "BLEND": np.array([0.25], np.float32), "SEEDS": np.array([3, 4], np.int64), "WALK": np.array([0.5], np.float32),
        "STEPS": np.array([4], np.int32), "GUIDANCE": np.array([7.0], np.float32),
        "STRENGTH": np.array([0.75], np.float32),
    }
    values.update(overrides)
    return pb_utils.InferenceRequest([pb_utils.Tensor(k, v) for k, v in values.items() if v is not None])


def test_model_py_renders_a_spectrogram_and_isolates_bad_requests(model):
    import sys

    pb_utils = sys.modules["triton_python_backend_utils"]
    good, bad = model.execute([request(pb_utils), request(pb_utils, SEEDS=None)])
    assert good.error is None
    image = good.output_tensors[0].as_numpy()
    assert good.output_tensors[0].name() == "SPECTROGRAM" and image.shape == (512, 512, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 255
    assert bad.error is not None and "SEEDS" in bad.error.message()
    again = model.execute([request(pb_utils)])[0].output_tensors[0].as_numpy()
    assert np.array_equal(image, again)  # same seeds, same image


def test_the_shipped_config_loads_the_model_from_the_hub_cache(tmp_path):
    """config.pbtxt's own parameters, as Triton passes them, initialise model.py on a tiny
    pipeline stored in the Hugging Face cache layout the fill Job writes (offline)."""
    import json
    import subprocess
    import sys

    parameters = triton_server.shipped_parameters()
    repo = parameters["MODEL"]["string_value"]
    assert "/" in repo and not repo.startswith("/")  # a hub name, resolved in HF_HOME
    commit = "0" * 40
    cache = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    import shutil

    shutil.copytree(tiny_stable_diffusion(tmp_path / "built"), cache / "snapshots" / commit)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tests import triton_server
import importlib.util
sys.modules["triton_python_backend_utils"] = triton_server.backend_utils()
spec = importlib.util.spec_from_file_location("m", triton_server.MODEL_DIR / "1" / "model.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
model = module.TritonPythonModel()
model.initialize({{"model_config": json.dumps({{"parameters": {json.dumps(parameters)}}}),
                   "model_instance_kind": "CPU", "model_instance_device_id": "0"}})
print(model.engine.device)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "cpu"


def test_music_service_generates_through_triton(loop, instances):
    server = triton_server.start(instances)
    try:
        settings = MusicSettings(backend="triton", triton_url=server.address, steps=4)
        running = start(loop, [MusicServicer(settings, ServerSettings())])
        try:
            events = list(music_pb2_grpc.MusicGeneratorStub(channel(running.address)).Generate(
                music_pb2.GenerateRequest(spans=timeline(("joy", 0.0, 5.0), ("sadness", 5.0, 9.0))), timeout=600))
        finally:
            loop.run(running.stop(0))
    finally:
        server.stop(0)
    assert events[0].header.backend == "triton" and events[0].header.total_samples == 9 * RATE
    audio = np.frombuffer(b"".join(e.chunk.pcm for e in events[1:]), dtype="<f4")
    assert audio.shape == (9 * RATE * 2,) and np.abs(audio).max() > 0.1
    assert server.refused == []  # every request the service sent passes Triton's checks
    assert server.peak_executing == settings.triton_concurrency  # both instances worked at once


def test_clips_sent_in_parallel_give_the_same_music_as_one_at_a_time(instances):
    from services.music.riffusion import RiffusionBackend, TritonEngine

    server = triton_server.start(instances)
    spans = [("fear", 0.0, 4.0), ("joy", 4.0, 8.5)]  # a clip each, rendered at once
    try:
        rendered = {}
        for concurrency in (1, 2):
            engine = TritonEngine(server.address, timeout_s=60, concurrency=concurrency)
            backend = RiffusionBackend("unused", steps=3, engine=engine)
            rendered[concurrency], _ = backend.generate(spans, sample_rate=RATE, seed=7, tempo=None)
    finally:
        server.stop(0)
    assert np.array_equal(rendered[1], rendered[2])


def test_the_test_server_refuses_what_triton_would(model):
    """The stand-in checks requests against the shipped config.pbtxt as Triton does, so a
    client that sends the wrong names, types or shapes fails here as it would in production."""
    import tritonclient.grpc as client
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    def infer(**overrides):
        values = {
            "IMAGE": np.zeros((512, 512, 3), np.uint8), "PROMPT_FROM": np.array([b"a"], dtype=object),
            "PROMPT_TO": np.array([b"b"], dtype=object), "BLEND": np.zeros(1, np.float32),
            "SEEDS": np.array([1, 2], np.int64), "WALK": np.zeros(1, np.float32), "STEPS": np.array([2], np.int32),
            "GUIDANCE": np.ones(1, np.float32), "STRENGTH": np.full(1, 0.5, np.float32), **overrides}
        inputs = []
        for key, value in values.items():
            if value is None:
                continue
            tensor = client.InferInput(key, list(value.shape),
                                       "BYTES" if value.dtype == object else np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return client.InferenceServerClient(server.address).infer("riffusion", inputs, client_timeout=60)

    server = triton_server.start(model)
    try:
        assert infer().as_numpy("SPECTROGRAM").shape == (512, 512, 3)
        for overrides, message in [
            ({"STRENGTH": None}, "missing required input(s) ['STRENGTH']"),
            ({"STEPS": np.array([2.0], np.float32)},
             "'STEPS' data-type is 'FP32', but model 'riffusion' expects 'INT32'"),
            ({"IMAGE": np.zeros((256, 256, 3), np.uint8)}, "unexpected shape for input 'IMAGE'"),
            ({"SEEDS": np.array([1], np.int64)}, "unexpected shape for input 'SEEDS'"),
            ({"NOISE": np.zeros(1, np.float32)}, "unexpected inference input 'NOISE'"),
        ]:
            with pytest.raises(InferenceServerException, match=re.escape(message)):
                infer(**overrides)
    finally:
        server.stop(0)
    assert len(server.refused) == 5


def test_a_triton_server_without_the_model_is_refused_at_load(model):
    from bgm.errors import Unsupported
    from services.music.riffusion import TritonEngine

    server = triton_server.start(model, name="something-else")
    try:
        with pytest.raises(Unsupported, match="no ready model 'riffusion' after waiting 1 s"):
            TritonEngine(server.address, timeout_s=10, wait_s=1)
    finally:
        server.stop(0)
    with pytest.raises(Unsupported, match="cannot be reached"):
        TritonEngine(server.address, timeout_s=10)


def test_the_music_service_waits_for_tritons_model_to_become_ready(model):
    """Triton loads its model while the music service starts: loading waits, then serves."""
    import threading
    import time

    from services.music.riffusion import TritonEngine

    server = triton_server.start(model)
    server.model_ready = False
    threading.Timer(1.5, lambda: setattr(server, "model_ready", True)).start()
    began = time.monotonic()
    try:
        TritonEngine(server.address, timeout_s=10, wait_s=60)
    finally:
        server.stop(0)
    assert 1.5 <= time.monotonic() - began < 10
