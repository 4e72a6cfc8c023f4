"""Builds a Riffusion training set from mood-tagged music you are allowed to train on.

    python -m services.music.dataset SRC... -o DIR [--max-clips-per-track N]

SRC is an audio file, a folder of them, or the name of an installed package whose tags
bgm knows (``immich-memories-music``). Every track needs an emotion or a mood bgm maps to
one, and a licence: from a sidecar (``TRACK.json`` beside the file, or ``tags.json`` /
``tags.csv`` in its folder; fields ``file``, ``emotion`` or ``mood``, ``licence``, and
optionally ``tempo``, ``key``, ``instruments``) or from the package's own tag list. Tracks
without either are refused, with the reason, before anything is written.

Each track is cut into 5.12 s clips that start on its beats, one after another, and each
clip becomes a 512x512 spectrogram image with the codec the music service decodes
(``services.music.spectrogram``). DIR/train holds the images and a ``metadata.jsonl``
(``file_name``, ``text`` = caption, and the tags) that diffusers' training scripts and
``datasets``' imagefolder read; DIR/dataset.json summarises clips per emotion, sources and
licences.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bgm import vocab
from services.music import spectrogram

P = spectrogram.PARAMS
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac"}
SIDECARS = ("tags.json", "tags.csv")

# Mood words of production-music libraries -> the emotion whose spans they should score.
MOOD_EMOTIONS: dict[str, str] = {
    **dict.fromkeys(("happy", "joyful", "cheerful", "uplifting", "bright", "tender", "romantic"), vocab.JOY),
    **dict.fromkeys(("sad", "melancholic", "melancholy", "nostalgic", "somber", "sombre", "sentimental"),
                    vocab.SADNESS),
    **dict.fromkeys(("angry", "aggressive", "intense", "furious", "heavy"), vocab.ANGER),
    **dict.fromkeys(("scary", "dark", "tense", "suspenseful", "ominous", "eerie"), vocab.FEAR),
    **dict.fromkeys(("energetic", "playful", "quirky", "surprising", "exciting"), vocab.SURPRISE),
    **dict.fromkeys(("disgusting", "uneasy", "dissonant", "grotesque", "gross"), vocab.DISGUST),
    **dict.fromkeys(("calm", vocab.NEUTRAL, "relaxed", "peaceful", "ambient", "chill"), vocab.NEUTRAL),
}
# Licence values that say nobody granted the right to train on the track.
NOT_LICENSED = {"", "unknown", "none", "unlicensed", "all rights reserved", "proprietary", "copyrighted"}

KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Krumhansl-Kessler key profiles (major, minor), tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


class DatasetError(ValueError):
    """Input the builder refuses, with what to do about it."""


@dataclass(frozen=True)
class Track:
    path: Path
    emotion: str
    licence: str
    mood: str = ""
    tempo: float | None = None
    key: str = ""
    instruments: tuple[str, ...] = ()
    source: str = ""  # where the tags came from


@dataclass(frozen=True)
class Clip:
    file_name: str
    text: str
    emotion: str
    mood: str
    tempo: float
    key: str
    instruments: list[str]
    source: str
    licence: str
    start_s: float
    max_value: float  # the amplitude black stands for: decodes the image back to audio
    beats: list[float] = field(default_factory=list)  # beat times inside the clip, from its start


def caption(emotion: str, mood: str = "", tempo: float | None = None, key: str = "",
            instruments: Sequence[str] = ()) -> str:
    """The training caption, and the prompt the music service builds from the same parts."""
    parts = [f"{emotion} music"]
    if mood and mood != emotion:
        parts.append(f"{mood} mood")
    if instruments:
        parts.append(" and ".join(instruments))
    if tempo:
        parts.append(f"{round(tempo)} bpm")
    if key:
        parts.append(key)
    return ", ".join(parts)


def emotion_of(emotion: str, mood: str, where: str) -> str:
    if emotion:
        if emotion not in vocab.EMOTIONS:
            raise DatasetError(f"{where}: emotion {emotion!r} is not {vocab.choices(vocab.EMOTIONS)}")
        return emotion
    if mood.lower() in MOOD_EMOTIONS:
        return MOOD_EMOTIONS[mood.lower()]
    if mood:
        raise DatasetError(f"{where}: mood {mood!r} maps to no emotion; add an {vocab.EMOTION_TAG!r} field "
                           f"({vocab.choices(vocab.EMOTIONS)})")
    raise DatasetError(f"{where}: untagged (no {vocab.EMOTION_TAG!r} or 'mood'); tag it in a sidecar "
                       f"({', '.join(SIDECARS)} in its folder, or TRACK.json beside it)")


def licensed(licence: str, where: str) -> str:
    if licence.strip().lower() in NOT_LICENSED:
        raise DatasetError(f"{where}: no licence that allows training ('licence' is {licence!r}); only music you "
                           "own or that is licensed for machine-learning use may go into a dataset")
    return licence.strip()


def track_from_tags(path: Path, tags: dict[str, object], source: str) -> Track:
    where = str(path)
    mood = str(tags.get("mood") or "").strip()
    emotion = emotion_of(str(tags.get(vocab.EMOTION_TAG) or "").strip().lower(), mood, where)
    licence = licensed(str(tags.get("licence") or tags.get("license") or ""), where)
    tempo_value = tags.get("tempo") or tags.get("bpm")
    listed = tags.get("instruments") or ()
    names = re.split(r"[;,|]", listed) if isinstance(listed, str) else list(listed)  # type: ignore[call-overload]
    instruments = tuple(str(name).strip() for name in names if str(name).strip())
    return Track(path, emotion, licence, mood.lower(), float(str(tempo_value)) if tempo_value else None,
                 str(tags.get("key") or "").strip(), instruments, source)


# --- tags that packages ship -------------------------------------------------------------

IMMICH_LINE = re.compile(r"^\s+(?P<file>\S+\.opus)\s+(?P<bpm>\d+)\s+bpm\s+(?P<key>[A-G][#b]?\s+(?:major|minor))"
                         r"\s+seed\s+\d+\s+\[(?P<instruments>[^\]]*)\]")


def immich_memories_music() -> dict[Path, Track]:
    """The package's LICENSE-MUSIC lists every track: mood folder, tempo, key, instruments;
    all MIT (generated locally, nothing sampled)."""
    from importlib import metadata

    import immich_memories_music as package

    tracks_dir = Path(package.__file__).parent / "tracks"
    dist = metadata.distribution("immich-memories-music")
    text = next((f.read_text() for f in dist.files or () if f.name == "LICENSE-MUSIC"), None)
    if text is None:
        raise DatasetError("immich-memories-music ships no LICENSE-MUSIC: cannot tell its tracks' licence")
    licence = f"{dist.metadata['License-Expression'] or 'MIT'} (immich-memories-music {dist.version})"
    tracks: dict[Path, Track] = {}
    mood = ""
    for line in text.splitlines():
        if re.fullmatch(r"[a-z]+/", line.strip()):
            mood = line.strip().rstrip("/")
        elif (match := IMMICH_LINE.match(line)) and mood:
            path = (tracks_dir / mood / match["file"]).resolve()
            tags = {"mood": mood, "licence": licence, "tempo": match["bpm"], "key": match["key"],
                    "instruments": match["instruments"]}
            tracks[path] = track_from_tags(path, tags, "immich-memories-music")
    return tracks


PACKAGES = {"immich-memories-music": immich_memories_music}


def package_tracks() -> dict[Path, Track]:
    """Tracks of the known packages that are installed, by resolved path."""
    found: dict[Path, Track] = {}
    for reader in PACKAGES.values():
        try:
            found.update(reader())
        except ImportError:
            continue
    return found


# --- sidecars ----------------------------------------------------------------------------

def read_sidecar(path: Path) -> dict[str, dict[str, object]]:
    """A folder sidecar: file name -> tags. JSON is a list of objects or {file: tags}; CSV has
    a ``file`` column."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows: list[dict[str, object]] = list(csv.DictReader(handle))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = [{"file": k, **v} for k, v in data.items()] if isinstance(data, dict) else list(data)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the tags ({exc})") from exc
    table: dict[str, dict[str, object]] = {}
    for row in rows:
        name = str(row.get("file") or "").strip()
        if not name:
            raise DatasetError(f"{path}: a row has no 'file'")
        table[name] = row
    return table


def tags_for(path: Path) -> dict[str, object] | None:
    beside = path.with_suffix(path.suffix + ".json")
    if beside.is_file():
        data = json.loads(beside.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise DatasetError(f"{beside}: expected one JSON object of tags")
        return data
    for name in SIDECARS:
        sidecar = path.parent / name
        if sidecar.is_file():
            table = read_sidecar(sidecar)
            if path.name in table:
                return table[path.name]
    return None


def collect(sources: Iterable[str]) -> list[Track]:
    """Every track the sources name, tagged; refuses the lot if any is untagged or unlicensed."""
    known = package_tracks()
    tracks: list[Track] = []
    problems: list[str] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            reader = PACKAGES.get(source)
            if reader is None:
                problems.append(f"{source}: no such file or folder, nor a package with tags bgm reads "
                                f"({', '.join(PACKAGES)})")
                continue
            tracks.extend(sorted(reader().values(), key=lambda t: t.path))
            continue
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES) if path.is_dir() else [path]
        if not files:
            problems.append(f"{source}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
        for file in files:
            try:
                if file.resolve() in known:
                    tracks.append(known[file.resolve()])
                elif (tags := tags_for(file)) is not None:
                    tracks.append(track_from_tags(file, tags, "sidecar"))
                else:
                    emotion_of("", "", str(file))  # raises: untagged
            except DatasetError as exc:
                problems.append(str(exc))
    if problems:
        raise DatasetError("refusing to build the dataset:\n  " + "\n  ".join(problems))
    if not tracks:
        raise DatasetError("no tracks given")
    return tracks


# --- audio -------------------------------------------------------------------------------

def beat_times(audio: np.ndarray, tempo_hint: float | None = None) -> tuple[np.ndarray, float]:
    """Beat times (s) and tempo (BPM): librosa's tracker on a 10 ms onset envelope, each beat
    then moved to the strongest onset within 40 ms (the tracker's grid is only as fine as
    its frames and drifts between them)."""
    import librosa

    hop = P.hop_length
    envelope = librosa.onset.onset_strength(y=audio, sr=P.sample_rate, hop_length=hop)
    tempo, frames = librosa.beat.beat_track(onset_envelope=envelope, sr=P.sample_rate, hop_length=hop,
                                            start_bpm=tempo_hint or 120.0, units="frames", trim=False)
    reach = round(0.04 * P.sample_rate / hop)
    snapped = []
    for frame in np.asarray(frames, dtype=int):
        lo, hi = max(0, frame - reach), min(len(envelope), frame + reach + 1)
        snapped.append(lo + int(np.argmax(envelope[lo:hi])))
    times = librosa.frames_to_time(np.unique(snapped), sr=P.sample_rate, hop_length=hop)
    return np.asarray(times, dtype=np.float64), float(np.atleast_1d(tempo)[0])


def estimate_key(audio: np.ndarray) -> str:
    """Krumhansl-Schmuckler: the major or minor key whose profile best matches the chroma."""
    import librosa

    chroma = librosa.feature.chroma_stft(y=audio, sr=P.sample_rate, n_fft=4096, hop_length=2048).sum(axis=1)
    best, name = -2.0, ""
    for tonic in range(12):
        for profile, mode in ((MAJOR_PROFILE, "major"), (MINOR_PROFILE, "minor")):
            score = float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1])
            if score > best:
                best, name = score, f"{KEY_NAMES[tonic]} {mode}"
    return name


def clip_starts(beats: np.ndarray, duration_s: float) -> list[float]:
    """Clip starts on beats, each clip beginning on the first beat at or after the previous
    clip's end, while a whole clip still fits."""
    starts: list[float] = []
    ready = 0.0
    for beat in beats:
        if beat + P.clip_seconds > duration_s + 1e-9:
            break
        if beat >= ready - 1e-9:
            starts.append(float(beat))
            ready = beat + P.clip_seconds
    return starts


def slice_track(track: Track, out_dir: Path, index: int, max_clips: int) -> list[Clip]:
    from PIL import Image

    from bgm import media

    audio = media.decode_audio(track.path, P.sample_rate, 1, what=str(track.path))[:, 0]
    beats, tempo = beat_times(audio, track.tempo)
    key = track.key or estimate_key(audio)
    tempo = track.tempo or tempo
    peak = float(np.abs(audio).max()) or 1.0
    clips: list[Clip] = []
    for start_s in clip_starts(beats, audio.shape[0] / P.sample_rate):
        start = round(start_s * P.sample_rate)
        piece = audio[start : start + P.clip_samples]
        if float(np.sqrt(np.mean(piece**2))) < 0.01 * peak:  # near silence teaches nothing
            continue
        image, max_value = spectrogram.audio_to_image(piece)
        name = f"{index:04d}-{track.path.stem}-{len(clips):03d}.png"
        Image.fromarray(image).save(out_dir / name)
        inside = [round(float(b - start_s), 4) for b in beats if start_s <= b < start_s + P.clip_seconds]
        clips.append(Clip(name, caption(track.emotion, track.mood, tempo, key, track.instruments), track.emotion,
                          track.mood, round(tempo, 2), key, list(track.instruments), track.source, track.licence,
                          round(start_s, 4), max_value, inside))
        if len(clips) >= max_clips:
            break
    return clips


def build(sources: Sequence[str], out: Path, max_clips_per_track: int = 1000, log: bool = True) -> dict[str, object]:
    """Writes the dataset; returns its summary (also DIR/dataset.json)."""
    tracks = collect(sources)
    train = out / "train"
    if train.exists() and any(train.iterdir()):
        raise DatasetError(f"{train} is not empty: choose a new output folder")
    train.mkdir(parents=True, exist_ok=True)
    clips: list[Clip] = []
    for index, track in enumerate(tracks):
        made = slice_track(track, train, index, max_clips_per_track)
        if log:
            print(f"{track.path.name}: {len(made)} clips ({track.emotion})", file=sys.stderr)
        clips.extend(made)
    with (train / "metadata.jsonl").open("w", encoding="utf-8") as handle:
        for clip in clips:
            handle.write(json.dumps(asdict(clip)) + "\n")
    per_emotion = Counter(c.emotion for c in clips)
    summary: dict[str, object] = {
        "clips": len(clips),
        "clips_per_emotion": {e: per_emotion.get(e, 0) for e in vocab.EMOTIONS},
        "tracks": len(tracks),
        "licences": sorted({t.licence for t in tracks}),
        "codec": asdict(P),
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def read_metadata(dataset: Path) -> list[dict[str, object]]:
    """The rows of a dataset folder (DIR or DIR/train)."""
    folder = dataset / "train" if (dataset / "train" / "metadata.jsonl").is_file() else dataset
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise DatasetError(f"{dataset} has no metadata.jsonl (build one with python -m services.music.dataset)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row["path"] = str(folder / str(row["file_name"]))
    if not rows:
        raise DatasetError(f"{path} lists no clips")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.music.dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", metavar="SRC", help="audio files, folders, or a package name")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the dataset folder to create")
    parser.add_argument("--max-clips-per-track", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        summary = build(args.sources, args.out, args.max_clips_per_track)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = summary["clips_per_emotion"]
    assert isinstance(counts, dict)
    print(f"{summary['clips']} clips from {summary['tracks']} tracks in {args.out}")
    for emotion, count in counts.items():
        print(f"  {emotion:<9} {count}")
    print(f"licences: {'; '.join(summary['licences'])}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
