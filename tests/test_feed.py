"""The gateway's plumbing between streaming stages: the feed, the supply, merge, first failure."""

from __future__ import annotations

import asyncio

import pytest

from gateway.feed import Feed, Supply, first_failure, merge


async def collect(feed: Feed) -> bytes:
    return b"".join([piece async for piece in feed.read()])


def test_the_reader_follows_the_writer_and_a_retried_writer_adds_only_what_is_new():
    async def scenario() -> tuple[bytes, bytes]:
        feed = Feed()
        early = asyncio.ensure_future(collect(feed))  # reading before anything is written
        await feed.write_at(0, b"abc")
        await asyncio.sleep(0)
        await feed.write_at(3, b"def")
        # A retried producer starts over from zero: the overlap is dropped, the rest kept.
        new = await feed.write_at(0, b"abcdefgh")
        await feed.close()
        return await early, new

    got, new = asyncio.run(scenario())
    assert got == b"abcdefgh" and new == b"gh"


def test_a_feed_that_drops_what_was_read_holds_only_what_is_in_flight(monkeypatch):
    """The remix's feeds: the reader's pieces are gone once taken, the producer waits while
    AHEAD_BYTES are unread, and a second read is refused rather than given half a track."""
    monkeypatch.setattr(Feed, "AHEAD_BYTES", 4)

    async def scenario() -> tuple[bytes, list[int]]:
        feed = Feed()
        held: list[int] = []

        async def produce() -> None:
            for start in range(0, 12, 3):
                await feed.write_at(start, b"abcdefghijkl"[start : start + 3])
                held.append(sum(len(p) for p in feed.pieces))
            await feed.close()

        producer = asyncio.ensure_future(produce())
        await asyncio.sleep(0.01)
        assert feed.size == 6  # two writes in, the third waits for the reader
        got = await collect(feed)
        await producer
        assert not feed.replayable and feed.pieces == []
        with pytest.raises(RuntimeError, match="start its producer over"):
            await collect(feed)
        return got, held

    got, held = asyncio.run(scenario())
    assert got == b"abcdefghijkl"
    assert max(held) <= 6  # never more than AHEAD_BYTES plus the piece being added


def test_a_supply_starts_its_stage_over_only_once_something_was_taken():
    async def scenario() -> tuple[int, bytes, bytes]:
        runs = 0

        async def produce(feed: Feed, fmt: asyncio.Future) -> None:
            nonlocal runs
            runs += 1
            if not fmt.done():
                fmt.set_result("format")
            await feed.write_at(0, b"track")
            await feed.close()

        supply = Supply(produce)
        supply.again()  # nothing taken yet: the same run serves
        first = await collect(supply.feed)
        supply.again()  # what was taken is gone: the stage runs again into a new feed
        again = await collect(supply.feed)
        await supply.close()
        return runs, first, again

    runs, first, again = asyncio.run(scenario())
    assert (runs, first, again) == (2, b"track", b"track")


def test_a_stage_that_fails_before_its_format_tells_whoever_waits_for_it():
    async def scenario() -> None:
        async def produce(feed: Feed, fmt: asyncio.Future) -> None:
            await feed.close(LookupError("separation failed"))
            raise LookupError("separation failed")

        supply = Supply(produce)
        with pytest.raises(LookupError, match="separation failed"):
            await supply.fmt
        with pytest.raises(LookupError, match="separation failed"):
            await collect(supply.feed)
        await supply.close()

    asyncio.run(scenario())


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
