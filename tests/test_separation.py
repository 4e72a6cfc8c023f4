"""DeepFilterNet on two cores: a long recording is cleaned in two halves at once. The first
half must be what one pass gives, sample for sample, and the second must join it without a
seam (tests/test_mixer.py checks what the separation itself recovers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bgm import audio
from bgm.media import decode_audio
from services.mixer import separation
from tests.conftest import speak

RATE = separation.SAMPLE_RATE


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> np.ndarray:
    """40 s of speech lines over a music bed, mono."""
    import immich_memories_music

    tmp = tmp_path_factory.mktemp("sep")
    lines = [decode_audio(speak(text, tmp / f"l{i}.wav"), RATE, 1)[:, 0] for i, text in enumerate(
        ("The ferry leaves at noon and the crossing takes an hour.",
         "Bring a coat, the wind on deck is colder than you think."))]
    track = sorted(Path(immich_memories_music.__file__).parent.glob("tracks/calm/*.opus"))[0]
    n = 40 * RATE
    bed = decode_audio(track, RATE, 1)[:, 0]
    bed = np.resize(bed, n) * 0.1
    speech = np.zeros(n, dtype=np.float32)
    at = RATE // 2
    while at < n:  # speech across the middle, where the halves join
        line = lines[(at // RATE) % 2][: n - at]
        speech[at : at + line.shape[0]] = line
        at += line.shape[0] + RATE // 3
    return (speech + bed).astype(np.float32)


def test_two_halves_at_once_join_the_one_pass_without_a_seam(recording, tmp_path, monkeypatch):
    model = separation.DeepFilterNet()
    whole = np.concatenate(list(model.speech_blocks(recording)))
    monkeypatch.setattr(separation, "SPLIT_MIN_S", 10.0)
    # The services read the recording from its spool: each half through a reader of its own.
    path = tmp_path / "rec.pcm"
    path.write_bytes(audio.float_to_pcm(recording[:, None], audio.PCM_F32LE))
    spooled = audio.MonoPcmFile(path, audio.audio_format(RATE, 1, audio.PCM_F32LE))
    split = np.concatenate(list(model.speech_blocks(spooled)))
    assert split.shape == whole.shape == recording.shape
    mid = recording.shape[0] // 2 // model.frame * model.frame
    np.testing.assert_array_equal(split[:mid], whole[:mid])  # the first half is the one pass

    def snr(a: np.ndarray, b: np.ndarray) -> float:
        return float(10 * np.log10(np.sum(b**2) / max(np.sum((a - b) ** 2), 1e-20)))

    first_second = slice(mid, mid + RATE)
    after = slice(mid + RATE, None)
    print(f"\nsecond half against one pass: SNR {snr(split[first_second], whole[first_second]):.1f} dB in its "
          f"first second, {snr(split[after], whole[after]):.1f} dB after (16-bit spool)")
    assert snr(split[first_second], whole[first_second]) > 30
    assert snr(split[after], whole[after]) > 30
    # No click at the join: the step there is no larger than the signal's own steps.
    steps = np.abs(np.diff(split))
    assert steps[mid - 1] <= np.percentile(steps, 99.9)
