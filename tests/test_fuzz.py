"""Bounded fuzzing (hypothesis) of the gateway's input handling and of chunk reassembly.
``python -m bench.fuzz`` runs the same targets for longer."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgm.v1 import gateway_pb2
from tests.fuzz_targets import reassemble, request_streams, run_gateway_input

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(request_streams())
def test_gateway_input_is_accepted_or_refused_never_broken(messages):
    outcome = run_gateway_input(messages)
    assert outcome in ("ok", "refused")
    if outcome == "ok":
        assert messages and messages[0].WhichOneof("payload") == "options"


@FAST
@given(st.binary(min_size=1, max_size=4096), st.integers(1, 5000))
def test_chunks_reassemble_exactly(data, size):
    assert reassemble(data, size) == data


@FAST
@given(st.binary(max_size=512))
def test_random_bytes_as_a_request_message_never_crash_the_parser(data):
    try:
        message = gateway_pb2.RemixRequest.FromString(data)
    except DecodeError:
        return
    outcome = run_gateway_input([message])
    assert outcome in ("ok", "refused")


def test_a_known_good_stream_is_accepted():
    options = gateway_pb2.RemixOptions(filename="clip.mp4")
    assert run_gateway_input([gateway_pb2.RemixRequest(options=options),
                              gateway_pb2.RemixRequest(video=b"x" * 100)]) == "ok"


@pytest.mark.parametrize("name", ["../x.mp4", "a/b.mp4", "x.mp4\0", "x\n.mp4", "x" * 256])
def test_bad_file_names_are_refused(name):
    assert run_gateway_input([gateway_pb2.RemixRequest(options=gateway_pb2.RemixOptions(filename=name))]) == "refused"
