"""The demucs separation path, on a tiny HTDemucs the test builds and saves."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("demucs")

from bgm.settings import ServerSettings
from bgm.v1 import mixer_pb2, mixer_pb2_grpc
from services.mixer.servicer import MixerServicer
from services.mixer.settings import MixerSettings
from tests.conftest import channel, start
from tests.test_mixer import separate
from tests.tiny_models import tiny_htdemucs


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_tiny_demucs_loads_from_disk_and_separates_through_grpc(loop, tmp_path, layout):
    checkpoint = tiny_htdemucs(tmp_path / "repo" / "htdemucs.th")
    where = checkpoint if layout == "file" else checkpoint.parent
    servicer = MixerServicer(MixerSettings(separation_backend="demucs", demucs_model=str(where), device="cpu"),
                             ServerSettings())
    running = start(loop, [servicer])
    try:
        rng = np.random.default_rng(0)
        seconds = 9.5  # longer than the model's 4 s segment: several overlapping windows
        mono = (0.1 * np.sin(np.arange(int(48_000 * seconds)) * 2 * np.pi * 220 / 48_000)
                + 0.02 * rng.standard_normal(int(48_000 * seconds))).astype(np.float32)
        stems = separate(mixer_pb2_grpc.MixerStub(channel(running.address)), mono,
                         (mixer_pb2.STEM_SPEECH, mixer_pb2.STEM_REST))
        speech, rest = stems[mixer_pb2.STEM_SPEECH], stems[mixer_pb2.STEM_REST]
        assert speech.shape == mono.shape and np.isfinite(speech).all()
        assert np.allclose(speech + rest, mono, atol=1e-5)
        assert float(np.abs(speech).max()) > 0  # the network really produced a stem
    finally:
        loop.run(running.stop(0))


def test_a_model_without_vocals_is_refused(tmp_path):
    from bgm.errors import Unsupported
    from services.mixer.separation import Demucs

    path = tiny_htdemucs(tmp_path / "no-vocals.th", sources=("drums", "bass"))
    with pytest.raises(Unsupported, match="no 'vocals' stem"):
        Demucs(str(path), "cpu")
