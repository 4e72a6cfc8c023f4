"""Where the CLI's calls go: a running gateway (``--gateway``, with TLS and a token as
asked), or the gateway and all four services started in this process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace

from grpc import aio

from bgm import vocab
from bgm.client import make_channel
from bgm.security import channel_credentials
from gateway.cli.progress import ProgressBars

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", vocab.CLI_MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", vocab.CLI_MAX_MESSAGE_BYTES)]


class Unreachable(Exception):
    """The gateway cannot be reached (exit code 4)."""


@contextlib.asynccontextmanager
async def remote(args: argparse.Namespace) -> AsyncIterator[aio.Channel]:
    """A channel to the gateway at ``args.gateway``; SettingsError for bad TLS files."""
    credentials = channel_credentials(args.tls_ca or "", args.tls_cert or "", args.tls_key or "")
    token = args.token or os.environ.get("BGM_TOKEN", "")
    channel = make_channel(args.gateway, credentials=credentials, token=token,
                           max_message_bytes=vocab.CLI_MAX_MESSAGE_BYTES)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        except TimeoutError:
            raise Unreachable(f"cannot reach the gateway at {args.gateway} (is it running?)") from None
        yield channel
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def in_process(bars: ProgressBars) -> AsyncIterator[aio.Channel]:
    """The gateway and the four services on loopback ports in this process."""
    from bgm import settings
    from bgm.server import start_server
    from gateway.servicer import GatewayServicer
    from gateway.settings import GatewaySettings
    from services.embedded import EmbeddedServices

    bars.note("bgm: starting the services in-process and loading models...")
    server_settings = replace(settings.server_settings(vocab.GATEWAY.name), host="127.0.0.1", port=0)
    # With BGM_GATEWAY_*_ADDRESS set, the in-process gateway uses those services instead.
    gateway = settings.load(GatewaySettings, vocab.GATEWAY.env_prefix)
    running = await start_server([GatewayServicer(gateway, server_settings, EmbeddedServices())], server_settings)
    try:
        await running.wait_ready(timeout=900)
        async with aio.insecure_channel(running.address, options=CHANNEL_OPTIONS) as channel:
            yield channel
    finally:
        await running.stop(1.0)


def channel_for(args: argparse.Namespace, bars: ProgressBars) -> contextlib.AbstractAsyncContextManager[aio.Channel]:
    return remote(args) if args.gateway else in_process(bars)
