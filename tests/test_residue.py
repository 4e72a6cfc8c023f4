"""The residue expander (services/mixer/residue.py): with nothing to expand it gives the speech
back sample for sample, however the speech is blocked; it takes down what the separator only
half kept and leaves what it fully kept; the bass setting does so in the bass alone; the
mixer's Separate uses it."""

from __future__ import annotations

import numpy as np
import pytest

from services.mixer import residue
from services.mixer.residue import Expansion

RATE = 48_000


def blocks(x: np.ndarray, sizes: list[int]):
    at, k = 0, 0
    while at < x.shape[0]:
        yield x[at : at + sizes[k % len(sizes)]]
        at += sizes[k % len(sizes)]
        k += 1


def signals(seconds: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE) + 37  # not a whole number of frames
    t = np.arange(n) / RATE
    voice = (0.3 * np.sin(2 * np.pi * 220 * t) * (t % 0.5 < 0.25)).astype(np.float32)
    noise = (0.05 * rng.standard_normal(n)).astype(np.float32)
    return voice, noise


@pytest.mark.parametrize("sizes", [[96_000], [17, 4_999, 333], [480], [10**7]])
def test_cells_above_the_knee_come_back_sample_for_sample_whatever_the_blocks(sizes):
    voice, noise = signals()
    kept = 0.5 * (voice + noise)  # every cell kept at gain 0.5, above a knee of 0.4
    out = list(residue.expand(voice + noise, blocks(kept, sizes), Expansion(3.0, 0.4, 4.0, 300.0)))
    joined = np.concatenate(out)
    assert joined.shape == kept.shape
    np.testing.assert_allclose(joined, kept, atol=2e-6)


@pytest.mark.parametrize("off", [Expansion(1.0, 0.8), Expansion(1.0, 0.8, 3.0, 0.0), Expansion(1.0, 0.8, 1.0, 200.0)])
def test_power_one_hands_the_blocks_through(off):
    voice, noise = signals()
    pieces = list(blocks(voice, [1000]))
    assert all(a is b for a, b in zip(residue.expand(voice + noise, pieces, off), pieces, strict=True))


def test_what_was_half_kept_goes_down_and_what_was_kept_stays():
    voice, noise = signals(seed=1)
    mixture = voice + noise
    kept = voice + 0.25 * noise  # the separator let a quarter of the noise through
    out = np.concatenate(list(residue.expand(mixture, blocks(kept, [4_800]), Expansion(2.0, 0.8))))
    quiet = np.arange(out.shape[0]) / RATE % 0.5 > 0.27  # no voice here, only the noise left
    loud = (np.arange(out.shape[0]) / RATE % 0.5 > 0.02) & (np.arange(out.shape[0]) / RATE % 0.5 < 0.23)
    noise_before = 10 * np.log10(np.mean(kept[quiet] ** 2))
    noise_after = 10 * np.log10(np.mean(out[quiet] ** 2))
    assert noise_before - noise_after >= 8.0  # g = 0.25 under a knee of 0.8: about 10 dB more
    voice_error = 10 * np.log10(np.mean((out[loud] - voice[loud]) ** 2) / np.mean(voice[loud] ** 2))
    assert voice_error <= -20.0  # the tone's own cells were kept near 1: the voice is intact
    assert out.shape == kept.shape


def band_db(x: np.ndarray, low: float, high: float, where: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x[where])) ** 2
    hz = np.fft.rfftfreq(int(where.sum()), 1 / RATE)
    return float(10 * np.log10(spectrum[(hz >= low) & (hz < high)].sum()))


def test_the_bass_setting_takes_down_the_half_kept_bass_and_leaves_the_rest():
    """Bass power 3 up to 200 Hz: the noise the separator half kept goes about 20 dB down
    under 200 Hz (g = 0.25 under a knee of 0.8) and stays as it was over 300 Hz; the voice
    (a 220 Hz tone, kept whole) is intact."""
    voice, noise = signals(seed=3)
    kept = voice + 0.25 * noise
    out = np.concatenate(list(residue.expand(voice + noise, blocks(kept, [4_800]), Expansion(1.0, 0.8, 3.0, 200.0))))
    assert out.shape == kept.shape
    phase = np.arange(out.shape[0]) / RATE % 0.5
    quiet = phase > 0.27
    assert band_db(kept, 20, 180, quiet) - band_db(out, 20, 180, quiet) >= 15.0
    assert abs(band_db(kept, 300, 20_000, quiet) - band_db(out, 300, 20_000, quiet)) <= 0.2
    loud = (phase > 0.02) & (phase < 0.23)
    voice_error = 10 * np.log10(np.mean((out[loud] - kept[loud]) ** 2) / np.mean(voice[loud] ** 2))
    assert voice_error <= -20.0


@pytest.mark.parametrize("expansion", [Expansion(1.0, 0.8, 3.0, 200.0), Expansion(1.0, 0.6, 2.0, 500.0)])
def test_a_few_bins_alone_give_what_the_whole_fft_gives(expansion):
    """The bass alone is computed as a DFT at its bins (a matrix product), not as two whole
    FFTs a frame: the same output to float32 rounding, whatever the blocks."""
    voice, noise = signals(seed=4)
    kept = voice + 0.3 * noise
    few = np.concatenate(list(residue.expand(voice + noise, blocks(kept, [17, 4_999, 333]), expansion)))
    whole = np.concatenate(list(residue.expand(voice + noise, blocks(kept, [96_000]), expansion, few_bins=0)))
    assert few.shape == whole.shape == kept.shape
    np.testing.assert_allclose(few, whole, atol=1e-6)
    assert np.abs(few - kept).max() > 1e-3  # and the bins did change


def test_the_exponents_follow_the_bands():
    exponents = Expansion(2.0, 0.8, 3.0, 200.0).exponents(960)  # 50 Hz bins
    assert list(exponents[:6]) == [2.0, 2.0, 2.0, 2.0, 2.0, 1.0]  # 0-200 Hz: the stronger power
    assert Expansion(4.0, 0.8, 3.0, 200.0).exponents(960)[0] == 3.0  # never weaker than the band's


def test_the_mixer_keeps_the_expanded_speech_in_its_cache_under_the_setting(tmp_path):
    """Separate's speech with the expander on is what the cache hands back on the next run,
    and another setting is another cache entry (not the first one's speech)."""
    import threading

    from bgm.settings import ServerSettings
    from services.mixer.separation import DeepFilterNet
    from services.mixer.servicer import MixerServicer
    from services.mixer.settings import MixerSettings

    voice, noise = signals(seconds=3.0, seed=2)
    mono = voice + noise
    separator = DeepFilterNet(MixerSettings().attenuation_limit_db)

    class Unavailable:  # what the second run must not need: the separator itself
        name = separator.name

        def speech_blocks(self, mono, cancel=None):
            raise AssertionError("separated again instead of read from the cache")
            yield

    def separate(power: float, with_separator=separator) -> np.ndarray:
        settings = MixerSettings(residue_power=power, residue_bass_power=1.0, cache_dir=str(tmp_path))
        servicer = MixerServicer(settings, ServerSettings())
        return np.concatenate(list(servicer.speech_blocks(with_separator, mono, threading.Event())))

    expected = np.concatenate(list(residue.expand(mono, separator.speech_blocks(mono), Expansion(2.0, 0.8))))
    stopped = MixerServicer(MixerSettings(residue_power=2.0, residue_bass_power=1.0, cache_dir=str(tmp_path)),
                            ServerSettings())
    blocks = stopped.speech_blocks(separator, mono, threading.Event())
    next(blocks)
    blocks.close()  # a separation that stops early (cancelled, failed) leaves nothing in the cache
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with pytest.MonkeyPatch.context() as patch:  # a cache that cannot be written costs speed, not the request
        def refused(*args, **kwargs):
            raise OSError(28, "No space left on device")

        patch.setattr("bgm.cache.tempfile.mkstemp", refused)
        np.testing.assert_array_equal(separate(2.0), expected)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    first = separate(2.0)
    np.testing.assert_array_equal(first, expected)
    assert len(list(tmp_path.rglob("*.raw"))) == 1  # kept as raw floats, written as it was made
    np.testing.assert_array_equal(separate(2.0, Unavailable()), first)  # from the cache
    plain = separate(1.0)
    np.testing.assert_array_equal(plain, np.concatenate(list(separator.speech_blocks(mono))))
    assert len(list(tmp_path.rglob("*.raw"))) == 2 and not np.array_equal(plain, first)
