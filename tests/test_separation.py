"""DeepFilterNet on a spare core: once a core has been idle a while, what is left of a long
recording is cut in two and the second half cleaned at the same time. The part before the
cut must be what one pass gives, sample for sample, and the second must join it without a
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
    while at < n:  # speech across the middle, where the parts join
        line = lines[(at // RATE) % 2][: n - at]
        speech[at : at + line.shape[0]] = line
        at += line.shape[0] + RATE // 3
    return (speech + bed).astype(np.float32)


def snr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(b**2) / max(np.sum((a - b) ** 2), 1e-20)))


def test_what_is_left_once_a_core_is_idle_is_cleaned_in_two_without_a_seam(recording, tmp_path, monkeypatch):
    model = separation.DeepFilterNet()
    whole = np.concatenate(list(model.speech_blocks(recording)))
    monkeypatch.setattr(separation, "SPLIT_MIN_S", 10.0)
    asked = []

    def idle_on_the_third_ask(self: separation.IdleCores) -> bool:
        asked.append(True)
        return len(asked) == 3

    monkeypatch.setattr(separation.IdleCores, "idle", idle_on_the_third_ask)
    # The services read the recording from its spool: each part through a reader of its own.
    path = tmp_path / "rec.pcm"
    path.write_bytes(audio.float_to_pcm(recording[:, None], audio.PCM_F32LE))
    spooled = audio.MonoPcmFile(path, audio.audio_format(RATE, 1, audio.PCM_F32LE))
    split = np.concatenate(list(model.speech_blocks(spooled)))
    assert split.shape == whole.shape == recording.shape
    assert len(asked) == 3  # asked after each block until a helper started, then no more
    cut = int(np.flatnonzero(split != whole)[0])  # the helper's output starts at the cut
    assert cut % model.frame == 0 and 0.4 * split.shape[0] < cut < 0.8 * split.shape[0]
    first_second, after = slice(cut, cut + RATE), slice(cut + RATE, None)
    print(f"\ncut at {cut / RATE:.2f} s; after it, against one pass: SNR "
          f"{snr(split[first_second], whole[first_second]):.1f} dB in the first second, "
          f"{snr(split[after], whole[after]):.1f} dB after (16-bit spool)")
    assert snr(split[first_second], whole[first_second]) > 30
    assert snr(split[after], whole[after]) > 30
    # No click at the join: the step there is no larger than the signal's own steps.
    steps = np.abs(np.diff(split))
    assert steps[cut - 1] <= np.percentile(steps, 99.9)


def test_a_busy_machine_cleans_in_one_pass(recording, monkeypatch):
    model = separation.DeepFilterNet()
    one_pass = np.concatenate(list(model.speech_blocks(recording)))  # shorter than SPLIT_MIN_S
    monkeypatch.setattr(separation, "SPLIT_MIN_S", 10.0)
    monkeypatch.setattr(separation.IdleCores, "idle", lambda self: False)
    np.testing.assert_array_equal(np.concatenate(list(model.speech_blocks(recording))), one_pass)


def test_idle_cores_are_read_from_the_kernel(monkeypatch):
    """A machine left alone for WINDOW_S reads as idle; one kept busy on every core does not."""
    import threading
    import time

    monkeypatch.setattr(separation.IdleCores, "WINDOW_S", 0.5)
    watch = separation.IdleCores()
    assert watch.last is not None
    assert not watch.idle()  # too soon to tell
    stop = threading.Event()

    def spin() -> None:
        x = np.random.default_rng(0).standard_normal(200_000)
        while not stop.is_set():
            np.fft.rfft(x)  # releases the GIL: every core busy

    spinners = [threading.Thread(target=spin) for _ in range(watch.cores)]
    for t in spinners:
        t.start()
    try:
        time.sleep(0.6)
        busy = watch.idle()
    finally:
        stop.set()
        for t in spinners:
            t.join()
    assert not busy
