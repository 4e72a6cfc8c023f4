"""The fuzz targets of tests/test_fuzz.py, run for longer.

    python -m bench.fuzz [--examples 20000]
"""

from __future__ import annotations

import argparse
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_targets import reassemble, request_streams, run_gateway_input


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    budget = settings(max_examples=args.examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
    outcomes: dict[str, int] = {}

    @budget
    @given(request_streams())
    def gateway_input(messages):
        outcome = run_gateway_input(messages)
        assert outcome in ("ok", "refused")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    @budget
    @given(st.binary(min_size=1, max_size=65536), st.integers(1, 70000))
    def chunks(data, size):
        assert reassemble(data, size) == data

    for name, target in (("gateway input", gateway_input), ("chunk reassembly", chunks)):
        started = time.perf_counter()
        target()
        print(f"{name}: {args.examples} examples, no failure, {time.perf_counter() - started:.1f} s")
    print(f"gateway input outcomes: {outcomes}")


if __name__ == "__main__":
    main()
