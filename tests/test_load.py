"""Concurrent remixes: refused with a retry hint or served, never mixed up (bench/load.py
runs N = 4 and 16 and reports latency and memory)."""

from __future__ import annotations

import pytest

from bench.load import check_outputs, make_videos, report, run_load
from bgm.settings import ServerSettings
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from services.embedded import EmbeddedServices
from tests.conftest import start


@pytest.fixture(scope="module")
def gateway(loop):
    running = start(loop, [GatewayServicer(GatewaySettings(), ServerSettings(max_concurrency=2), EmbeddedServices())])
    yield running
    loop.run(running.stop(1))


def test_four_at_once_without_retry_get_served_or_a_retry_hint(gateway, tmp_path):
    videos = make_videos(tmp_path, 4, 0.8)
    outcomes = run_load(gateway.address, videos, attempts=1)
    assert all(o.ok or o.refusals == 1 for o in outcomes), [o.error for o in outcomes]
    assert 1 <= sum(o.ok for o in outcomes) <= 4
    assert sum(o.refusals for o in outcomes) >= 1  # two slots, four clients at once
    assert check_outputs(videos, outcomes, tmp_path) == sum(o.ok for o in outcomes)


def test_four_at_once_with_retry_all_succeed_with_their_own_output(gateway, tmp_path):
    videos = make_videos(tmp_path, 4, 0.8)
    outcomes = run_load(gateway.address, videos, attempts=100)
    print("\n" + report(4, outcomes, check_outputs(videos, outcomes, tmp_path)))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert check_outputs(videos, outcomes, tmp_path) == 4
