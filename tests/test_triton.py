"""The Triton path: the model repository's model.py, and the music service's triton backend
against a server speaking Triton's gRPC protocol that hosts that model.py."""

from __future__ import annotations

import os
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
def model(tmp_path_factory):
    return triton_server.load_model(tiny_stable_diffusion(tmp_path_factory.mktemp("sd")))


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


def test_music_service_generates_through_triton(loop, model):
    server, address = triton_server.start(model)
    try:
        settings = MusicSettings(backend="triton", triton_url=address, steps=4)
        running = start(loop, [MusicServicer(settings, ServerSettings())])
        try:
            events = list(music_pb2_grpc.MusicGeneratorStub(channel(running.address)).Generate(
                music_pb2.GenerateRequest(spans=timeline(("joy", 0.0, 7.0), ("sadness", 7.0, 12.0))), timeout=600))
        finally:
            loop.run(running.stop(0))
    finally:
        server.stop(0)
    assert events[0].header.backend == "triton" and events[0].header.total_samples == 12 * RATE
    audio = np.frombuffer(b"".join(e.chunk.pcm for e in events[1:]), dtype="<f4")
    assert audio.shape == (12 * RATE * 2,) and np.abs(audio).max() > 0.1


def test_a_triton_server_without_the_model_is_refused_at_load(model):
    from bgm.errors import Unsupported
    from services.music.riffusion import TritonEngine

    server, address = triton_server.start(model, name="something-else")
    try:
        with pytest.raises(Unsupported, match="no ready model 'riffusion'"):
            TritonEngine(address, timeout_s=10)
    finally:
        server.stop(0)
