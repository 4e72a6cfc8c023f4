"""``bgm``: remix a video, analyse one, make the example, or run the services.

Exit codes: 0 done; 2 bad usage, a missing/unreadable input file or an output path that
cannot be used; 3 the input was refused (INVALID_ARGUMENT); 4 a service or the gateway is
unavailable; 5 a deadline passed; 6 not authorised (token or certificate); 1 anything else.

A thin command over the gateway's client API: ``parser`` (arguments), ``commands`` (what
each subcommand does), ``connect`` (a running gateway, or all five services in-process),
``job`` (one Remix/Analyze call), ``progress`` (the bars), ``files`` (output paths and
what is written to them), ``project`` (the ``--project`` folder).
"""

from __future__ import annotations

import os
import sys

from gateway.cli.commands import TimelineRefused, UsageError
from gateway.cli.parser import parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from bgm import logs

    if args.command in ("remix", "analyze"):
        logs.configure("bgm-cli", os.environ.get("BGM_CLI_LOG_LEVEL", "WARNING"))
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"bgm: {exc}", file=sys.stderr)
        return 2
    except TimelineRefused as exc:
        print(f"bgm: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\nbgm: interrupted", file=sys.stderr)
        return 130
