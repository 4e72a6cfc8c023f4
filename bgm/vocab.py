"""The product's words, in one place: the emotions, each service's backend names, the
services themselves, message limits and the working sample rates.

Everything that names one of these imports it from here (a test greps the source tree), so
a new emotion, backend or service is added once and every table that must cover it is
checked against this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from bgm.v1 import common_pb2

# ----- emotions ---------------------------------------------------------------------
# In the proto enum's order (EMOTION_JOY = 1, ...), which probability vectors follow too.
JOY, SADNESS, DISGUST, ANGER, SURPRISE, FEAR, NEUTRAL = (
    "joy", "sadness", "disgust", "anger", "surprise", "fear", "neutral")
EMOTIONS: tuple[str, ...] = (JOY, SADNESS, DISGUST, ANGER, SURPRISE, FEAR, NEUTRAL)
_ENUM: dict[str, int] = {name: int(common_pb2.Emotion.Value(f"EMOTION_{name.upper()}")) for name in EMOTIONS}
_NAME: dict[int, str] = {value: name for name, value in _ENUM.items()}


def emotion_enum(name: str) -> int:
    """``"joy"`` -> ``EMOTION_JOY``; KeyError for a name that is not one of EMOTIONS."""
    return _ENUM[name]


def emotion_name(value: int) -> str | None:
    """``EMOTION_JOY`` -> ``"joy"``; None for UNSPECIFIED or an unknown value."""
    return _NAME.get(int(value))


# ----- backends, per service ---------------------------------------------------------
AUTO = "auto"  # the setting that picks the full model where a GPU and its weights are present
DEVICES: tuple[str, ...] = (AUTO, "cpu", "cuda")
STT_WHISPER = "whisper"
EMOTION_GOEMOTIONS, EMOTION_NADE, EMOTION_TRANSFORMERS = "goemotions", "nade", "transformers"
MUSIC_COMPOSER, MUSIC_RIFFUSION, MUSIC_TRITON = "composer", "riffusion", "triton"
SEPARATION_DEEPFILTERNET, SEPARATION_DEMUCS = "deepfilternet", "demucs"

EMOTION_BACKENDS: tuple[str, ...] = (EMOTION_GOEMOTIONS, EMOTION_NADE, EMOTION_TRANSFORMERS)
MUSIC_BACKENDS: tuple[str, ...] = (MUSIC_COMPOSER, MUSIC_RIFFUSION, MUSIC_TRITON)
SEPARATION_BACKENDS: tuple[str, ...] = (SEPARATION_DEEPFILTERNET, SEPARATION_DEMUCS)
# Variations a creator may ask of an emotion's music, for one span (SpanControl.style) or the
# whole video (MusicStyle.style): other instruments and grooves over the emotion's harmony
# and tempo (services/music/styles.py).
# The tag that names a track's or a clip's emotion in training datasets (sidecars, metadata.jsonl).
EMOTION_TAG = "emotion"
MUSIC_STYLES: tuple[str, ...] = ("piano", "strings", "band", "ambient", "cinematic", "acoustic", "electronic",
                                 "lo-fi", "orchestral")


def choices(names: tuple[str, ...]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"``, for error messages."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# ----- the services -------------------------------------------------------------------
@dataclass(frozen=True)
class Service:
    name: str  # as in `bgm serve NAME` and the deployment
    grpc_name: str  # the gRPC service's full name
    port: int  # the port the deployment gives it
    env_prefix: str  # its settings: BGM_<NAME>_*


STT = Service("stt", "bgm.v1.SpeechToText", 50051, "BGM_STT")
EMOTION = Service("emotion", "bgm.v1.EmotionClassifier", 50052, "BGM_EMOTION")
MUSIC = Service("music", "bgm.v1.MusicGenerator", 50053, "BGM_MUSIC")
MIXER = Service("mixer", "bgm.v1.Mixer", 50054, "BGM_MIXER")
GATEWAY = Service("gateway", "bgm.v1.Gateway", 50050, "BGM_GATEWAY")
SERVICES: tuple[Service, ...] = (STT, EMOTION, MUSIC, MIXER, GATEWAY)
BACKEND_SERVICES: tuple[Service, ...] = (STT, EMOTION, MUSIC, MIXER)

# ----- sizes and rates ------------------------------------------------------------------
MIB = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * MIB  # per gRPC message, both ways; media is chunked well below it
MIN_MESSAGE_BYTES = 2 * MIB  # the smallest limit a setting may choose (a chunk must fit)
# The CLI's own channel: room for a gateway whose limit was raised up to twice the default.
CLI_MAX_MESSAGE_BYTES = 2 * MAX_MESSAGE_BYTES
SEPARATION_RATE = 48_000  # separation, music for the mix, the mix itself
STT_RATE = 16_000  # what Whisper takes
