"""The gateway's plumbing between streaming stages: the replayable feed, merge, first failure."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.feed import Feed, first_failure, merge


async def collect(feed: Feed) -> bytes:
    return b"".join([piece async for piece in feed.read()])


def test_readers_follow_the_writer_and_a_retried_writer_adds_only_what_is_new():
    async def scenario() -> tuple[bytes, bytes, bytes]:
        feed = Feed()
        early = asyncio.ensure_future(collect(feed))  # reading before anything is written
        await feed.write_at(0, b"abc")
        await asyncio.sleep(0)
        await feed.write_at(3, b"def")
        # A retried producer starts over from zero: the overlap is dropped, the rest kept.
        await feed.write_at(0, b"abcdefgh")
        await feed.close()
        return await early, await collect(feed), await collect(feed)

    early, replay, again = asyncio.run(scenario())
    assert early == replay == again == b"abcdefgh"


def test_a_feed_kept_on_disk_reads_the_same_and_removes_its_files(tmp_path, monkeypatch):
    """An hour of separated speech goes to disk (FLAC segments): readers still follow the
    writer, retries still replay everything, in pieces of at most READ_BYTES."""
    monkeypatch.setattr(Feed, "READ_BYTES", 4)
    monkeypatch.setattr(Feed, "SEGMENT_BYTES", 6)
    path = tmp_path / "speech.pcm"

    async def scenario() -> tuple[bytes, bytes, list[bytes]]:
        feed = Feed(path)
        early = asyncio.ensure_future(collect(feed))
        await feed.write_at(0, b"abc")
        await asyncio.sleep(0)
        await feed.write_at(3, b"def")  # six bytes: the first segment
        await feed.write_at(0, b"abcdefghij")  # a retried producer: only "ghij" is new
        await feed.close()
        pieces = [piece async for piece in feed.read()]
        replay, first = await collect(feed), await early
        assert feed.pieces == [] and len(feed.segments) == 1 and feed.tail == b"ghij"  # on disk, not in memory
        assert [p.name for p in tmp_path.iterdir()] == ["speech.pcm.0.flac"]
        feed.discard()
        return first, replay, pieces

    early, replay, pieces = asyncio.run(scenario())
    assert early == replay == b"abcdefghij"
    assert pieces == [b"abcd", b"ef", b"ghij"]
    assert not list(tmp_path.iterdir())


def test_any_bytes_come_back_from_the_segments_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(Feed, "SEGMENT_BYTES", 4096)
    data = np.random.default_rng(3).integers(0, 256, 50_001, dtype=np.uint8).tobytes()  # not audio, odd length

    async def scenario() -> bytes:
        feed = Feed(tmp_path / "speech.pcm")
        reader = asyncio.ensure_future(collect(feed))
        for start in range(0, len(data), 3_001):
            await feed.write_at(start, data[start : start + 3_001])
            await asyncio.sleep(0)
        await feed.close()
        assert len(feed.segments) == len(data) // 4096
        got = await reader
        assert await collect(feed) == got
        feed.discard()
        return got

    assert asyncio.run(scenario()) == data


def test_a_gap_and_a_producer_failure_reach_the_reader():
    async def scenario() -> None:
        feed = Feed()
        with pytest.raises(ValueError, match="gap in the feed"):
            await feed.write_at(5, b"x")
        await feed.write_at(0, b"ok")
        reader = asyncio.ensure_future(collect(feed))
        await asyncio.sleep(0)
        await feed.close(RuntimeError("separation failed"))
        with pytest.raises(RuntimeError, match="separation failed"):
            await reader

    asyncio.run(scenario())


def test_merge_interleaves_as_items_become_ready_and_raises_the_first_error():
    async def slow(items: list[str], delay: float):
        for item in items:
            await asyncio.sleep(delay)
            yield item

    async def broken():
        yield "x"
        raise OSError("source broke")

    async def scenario() -> list[str]:
        got = [item async for item in merge(slow(["a1", "a2", "a3"], 0.03), slow(["b1"], 0.01))]
        with pytest.raises(OSError, match="source broke"):
            async for _ in merge(slow(["a"], 0.05), broken()):
                pass
        return got

    got = asyncio.run(scenario())
    assert got[0] == "b1" and sorted(got) == ["a1", "a2", "a3", "b1"]


def test_first_failure_raises_as_soon_as_one_task_fails():
    async def scenario() -> float:
        loop = asyncio.get_running_loop()

        async def fail_soon() -> None:
            await asyncio.sleep(0.05)
            raise LookupError("stage failed")

        forever = asyncio.ensure_future(asyncio.sleep(60))
        began = loop.time()
        with pytest.raises(LookupError, match="stage failed"):
            await first_failure([forever, asyncio.ensure_future(fail_soon())])
        forever.cancel()
        return loop.time() - began

    assert asyncio.run(scenario()) < 5
