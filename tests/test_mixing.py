"""The MixAndMux stream of a remix, step by step (gateway/mixing.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from bgm import audio
from bgm.v1 import common_pb2, gateway_pb2, mixer_pb2
from gateway import mixing
from gateway.feed import Feed, Supply


def kinds(requests: list[mixer_pb2.MixRequest]) -> list[str]:
    out = []
    for r in requests:
        if r.WhichOneof("payload") == "chunk":
            name = mixer_pb2.Track.Name(r.chunk.track).removeprefix("TRACK_").lower()
            out.append(f"{name}{' last' if r.chunk.last else ''}")
        else:
            out.append(r.WhichOneof("payload"))
    return out


async def collected(source) -> list:
    return [item async for item in source]


def test_a_track_ends_with_its_last_marker():
    assert kinds(list(mixing.track(mixer_pb2.TRACK_BGM, [b"a", b"b"]))) == ["bgm", "bgm", "bgm last"]
    assert kinds(list(mixing.track(mixer_pb2.TRACK_BGM, []))) == ["bgm last"]


def test_speech_streams_as_it_is_separated_with_progress(loop):
    seen: list[float] = []

    async def progress(fraction: float, message: str) -> None:
        seen.append(fraction)

    async def go() -> list[mixer_pb2.MixRequest]:
        feed = Feed()
        await feed.write_at(0, b"x" * 100)
        await feed.write_at(100, b"y" * 100)
        await feed.close()
        return await collected(mixing.speech_track(feed, 200, progress))

    requests = loop.run(go())
    assert kinds(requests) == ["speech", "speech", "speech last"]
    assert b"".join(r.chunk.data for r in requests) == b"x" * 100 + b"y" * 100
    assert seen == [0.45, 0.9]


def supplied(fmt: common_pb2.AudioFormat, pcm: bytes, pause_s: float = 0.0) -> Supply:
    """A track made in two pieces, ``pause_s`` apart, as a stage would write it."""
    async def produce(feed: Feed, known: asyncio.Future[common_pb2.AudioFormat]) -> None:
        known.set_result(fmt)
        half = len(pcm) // 2
        await feed.write_at(0, pcm[:half])
        await asyncio.sleep(pause_s)
        await feed.write_at(half, pcm[half:])
        await feed.close()

    return Supply(produce)


def test_music_comes_after_the_words_and_in_the_mix_format(loop, tmp_path: Path):
    async def go(fmt: common_pb2.AudioFormat, pcm: bytes) -> list[mixer_pb2.MixRequest]:
        spoken, music = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
        spoken.set_result(mixer_pb2.SpeechSpans(spans=[common_pb2.TimeSpan(start_s=1, end_s=2)]))
        music.set_result(supplied(fmt, pcm))
        return await collected(mixing.music_track(spoken, music))

    stereo = audio.float_to_pcm(np.zeros((48_000, 2), dtype=np.float32), mixing.BGM_FORMAT.encoding)
    requests = loop.run(go(mixing.BGM_FORMAT, stereo))
    assert kinds(requests)[0] == "speech_spans" and kinds(requests)[-1] == "bgm last"
    assert b"".join(r.chunk.data for r in requests[1:]) == stereo
    # Music in another format is converted: one second of 24 kHz mono is one second at 48 kHz stereo.
    mono = audio.float_to_pcm(np.zeros((24_000, 1), dtype=np.float32), audio.PCM_S16LE)
    converted = loop.run(go(audio.audio_format(24_000, 1, audio.PCM_S16LE), mono))
    sent = b"".join(r.chunk.data for r in converted[1:])
    assert len(sent) == 48_000 * audio.bytes_per_frame(mixing.BGM_FORMAT)


def test_music_that_pauses_keeps_the_mix_stream_alive(loop, monkeypatch):
    """A span that renders for minutes (Riffusion on a CPU) must not leave the mix's stream
    silent past the mixer's idle timeout: empty SpeechSpans go meanwhile."""
    monkeypatch.setattr(mixing, "KEEP_ALIVE_S", 0.05)

    async def go() -> list[mixer_pb2.MixRequest]:
        spoken, music = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
        spoken.set_result(mixer_pb2.SpeechSpans())
        music.set_result(supplied(mixing.BGM_FORMAT, b"m" * 64, pause_s=0.3))
        return await collected(mixing.music_track(spoken, music))

    order = kinds(loop.run(go()))
    assert order[0] == "bgm" and order[-2:] == ["bgm", "bgm last"]
    assert order.count("speech_spans") >= 3


def test_the_stream_opens_with_config_and_the_whole_original(loop, tmp_path: Path):
    video = tmp_path / "in.mp4"
    video.write_bytes(b"v" * 1000)

    async def go() -> list[mixer_pb2.MixRequest]:
        running = asyncio.get_running_loop()
        speech = supplied(audio.audio_format(48_000, 1), b"s" * 8)
        spoken, music = running.create_future(), running.create_future()
        spoken.set_result(mixer_pb2.SpeechSpans())
        music.set_result(supplied(mixing.BGM_FORMAT, b"m" * 16))
        inputs = mixing.MixInputs(video, gateway_pb2.RemixOptions(filename="in.mp4"), speech, 2, music, spoken)

        async def progress(fraction: float, message: str) -> None:
            pass

        return await collected(mixing.requests(inputs, progress))

    requests = loop.run(go())
    order = kinds(requests)
    assert order[:3] == ["config", "original", "original last"]
    assert sorted(order[3:]) == sorted(["speech", "speech", "speech last", "bgm", "bgm", "bgm last"])
    assert requests[0].config.original_name == "in.mp4" and requests[0].config.speech_format.sample_rate_hz == 48_000


def test_a_finished_mix_is_handed_on_result_video_then_stems(loop, tmp_path: Path):
    async def answers():
        yield mixer_pb2.MixResponse(stem=mixer_pb2.StemChunk(stem=mixer_pb2.STEM_BGM, data=b"st"))
        yield mixer_pb2.MixResponse(media=b"ab")
        yield mixer_pb2.MixResponse(result=mixer_pb2.MixResult(duration_s=3))
        yield mixer_pb2.MixResponse(media=b"cd")

    output = tmp_path / "out.bin"
    held = loop.run(mixing.collect(answers(), output))
    assert output.read_bytes() == b"abcd"
    sent = [m.WhichOneof("event") for m in mixing.handed_on(held, output)]
    assert sent == ["result", "video", "stem"]
