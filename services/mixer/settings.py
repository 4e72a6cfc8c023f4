from __future__ import annotations

from dataclasses import dataclass

from bgm import vocab
from bgm.settings import check
from services.mixer import residue


@dataclass(frozen=True)
class MixerSettings:
    """``BGM_MIXER_*``: separation backend and the default mix levels."""

    # DeepFilterNet (offline default) or demucs (htdemucs: heavier, best on a GPU).
    separation_backend: str = vocab.SEPARATION_DEEPFILTERNET
    # Hub name, .th checkpoint, or directory of demucs models.
    demucs_model: str = "htdemucs"
    # How far DeepFilterNet may pull down what is not speech. Removing everything (100 dB)
    # also damages the speech: on a 161-word test with a music bed, Whisper tiny.en's WER
    # was 21.7 % at 100 dB, 13.7 % at 24 dB, 11.8 % at 18 dB, 16.1 % at 6 dB.
    attenuation_limit_db: float = 18.0
    # Then what separation only half kept can go further down (services/mixer/residue.py): a
    # time-frequency cell kept at gain g under residue_knee gets (g / knee) ** (power - 1)
    # more; 1 (the default) turns it off. At 2 / 0.8 the old bed under real speech fell 2-7 dB
    # more (bench.quality, all five clips past 20 dB), but the remix of the example's espeak
    # speech lost 4 more words of 121 (tests/test_gateway.py: WER 8.3 -> 11.6 %, 18.2 % at 1.5,
    # 24.8 % at 2.5) and clean real speech 4 of 258 (bench.residue --no-bed): opt in.
    residue_power: float = 1.0
    residue_knee: float = 0.8
    # ... and in the bass (up to residue_bass_hz), on by default: there a voice has only its
    # fundamental, which the separator keeps whole, and a bed its bass, which it half keeps
    # (bench.residue, 12 LU beds: LibriSpeech's bed under speech 18.5 -> 21.1 dB, the other
    # clips 0.3-2.5 dB further down, SI-SDR of the kept speech -0.4 to +1.5 dB).
    residue_bass_power: float = 3.0
    residue_bass_hz: float = 200.0
    device: str = vocab.AUTO
    # Whisper tiny.en on remixes of real speech (bench.quality, 12 LU beds): at 12 dB the new
    # music under speech cost 1.9 WER points pooled (3.9 % on the kept speech alone, 5.8 % with
    # the music), at 15 dB 0.8 (one clip 3.9), at 18 dB none on any clip measured. Since the
    # carve below, this is the depth in the speech band (200 Hz to 9 kHz) only.
    duck_db: float = 18.0
    loudness_lufs: float = -14.0
    true_peak_dbtp: float = -1.0
    fade_in_s: float = 1.5
    fade_out_s: float = 3.0
    attack_ms: float = 80.0
    release_ms: float = 400.0
    # How readily the music ducks for what may be speech (0..1; the VAD threshold is 1 - this).
    duck_sensitivity: float = 0.5
    # The music stays down this long after speech ends, so it does not rise between phrases.
    hold_ms: float = 150.0
    # The rest of the music (bass, air) dips only this far under speech, so the bed stays
    # present. bench.quality, 12 LU beds, pooled WER: 3.1 % at 12 dB, 3.5 % with a full-band
    # 18 dB duck; at 10 dB the example's espeak speech lost 5 words of 70, at 8 pooled 4.7 %.
    duck_wide_db: float = 12.0
    # Music level relative to the speech's loudness, outside speech.
    bgm_gain_db: float = -6.0
    audio_bitrate: str = "192k"
    # Separated speech and each programme's last mix kept by content in this folder
    # (bgm.cache), up to cache_mb: a second run on the same audio (a re-render of an edited
    # timeline) skips separation and mixes and encodes only what changed (reprise). Off when "".
    cache_dir: str = ""
    cache_mb: int = 4096

    @property
    def expansion(self) -> residue.Expansion:
        return residue.Expansion(self.residue_power, self.residue_knee, self.residue_bass_power,
                                 self.residue_bass_hz)

    def __post_init__(self) -> None:
        check(self.separation_backend in vocab.SEPARATION_BACKENDS, "BGM_MIXER_SEPARATION_BACKEND",
              f"{self.separation_backend!r} is not {vocab.choices(vocab.SEPARATION_BACKENDS)}")
        check(0 < self.attenuation_limit_db <= 100, "BGM_MIXER_ATTENUATION_LIMIT_DB", "must be in (0, 100]")
        check(1 <= self.residue_power <= 8, "BGM_MIXER_RESIDUE_POWER", "must be 1..8 (1: off)")
        check(0 < self.residue_knee <= 1, "BGM_MIXER_RESIDUE_KNEE", "must be in (0, 1]")
        check(1 <= self.residue_bass_power <= 8, "BGM_MIXER_RESIDUE_BASS_POWER", "must be 1..8 (1: off)")
        check(0 <= self.residue_bass_hz <= 1000, "BGM_MIXER_RESIDUE_BASS_HZ", "must be 0..1000 (0: off)")
        check(0 <= self.duck_db <= 60, "BGM_MIXER_DUCK_DB", "must be 0..60")
        check(-60 <= self.loudness_lufs <= 0, "BGM_MIXER_LOUDNESS_LUFS", "must be -60..0")
        check(-20 <= self.true_peak_dbtp <= 0, "BGM_MIXER_TRUE_PEAK_DBTP", "must be -20..0")
        check(0 <= self.duck_sensitivity <= 1, "BGM_MIXER_DUCK_SENSITIVITY", "must be 0..1")
        check(self.cache_mb >= 0, "BGM_MIXER_CACHE_MB", "must be 0 or more")
        check(0 <= self.hold_ms <= 5000, "BGM_MIXER_HOLD_MS", "must be 0..5000")
        check(0 <= self.duck_wide_db <= 60, "BGM_MIXER_DUCK_WIDE_DB", "must be 0..60")
