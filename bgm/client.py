"""Client side of the shared runtime: channels with the same message limits as the
servers, a retry policy for UNAVAILABLE only, deadlines, and health checks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bgm import logs, vocab
from bgm.errors import RETRY_INFO_KEY, read_retry_delay

log = logs.get("bgm.client")
T = TypeVar("T")

# Services whose methods all take a single request (unary or server-streaming): the
# channel may replay those itself. Client-streaming calls (Transcribe, Separate, MixAndMux,
# Remix) are retried by call_with_retry, which replays the whole stream: gRPC's own retry
# of a client stream against a restarting server crashed a gateway process in core
# ("ILLEGAL STATE: FORWARDED_BATCH", grpcio 1.85.1).
CHANNEL_RETRIED = ("bgm.v1.EmotionClassifier", "bgm.v1.MusicGenerator", "grpc.health.v1.Health")
DEFAULT_MAX_MESSAGE_BYTES = vocab.MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class RetryPolicy:
    """Retries UNAVAILABLE only: every other status means repeating will not help.

    ``call_with_retry`` keeps trying for ``budget_s`` after the first failure (30 s covers a
    service that restarts in 15 s, with room); ``max_attempts`` is the channel's own limit
    per call, and 1 turns retrying off altogether.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    budget_s: float = 30.0

    def service_config(self) -> str:
        # gRPC accepts 2..5 attempts; one attempt means no retry policy at all.
        policy = {
            "maxAttempts": min(self.max_attempts, 5),
            "initialBackoff": f"{self.initial_backoff_s}s",
            "maxBackoff": f"{self.max_backoff_s}s",
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        return json.dumps(
            {
                "loadBalancingConfig": [{"round_robin": {}}],
                "methodConfig": [
                    {"name": [{"service": s} for s in CHANNEL_RETRIED],
                     **({"retryPolicy": policy} if self.max_attempts >= 2 else {})}
                ],
            }
        )

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))


def make_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry: RetryPolicy | None = None,
    token: str = "",
) -> aio.Channel:
    """An aio channel to ``target`` (``host:port`` or ``dns:///name:port`` for round-robin),
    TLS when ``credentials`` are given, sending a bearer ``token`` with every call if set."""
    from bgm.security import bearer_interceptors

    interceptors = bearer_interceptors(token) if token else None
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        # A restarted service is found within seconds, not after gRPC's default 2-minute backoff.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 3000),
        ("grpc.service_config", (retry or RetryPolicy()).service_config()),
    ]
    if credentials is not None:
        return aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return aio.insecure_channel(target, options=options, interceptors=interceptors)


# grpcio's asyncio client reports a write into a stream whose connection just dropped as
# INTERNAL with exactly this text instead of UNAVAILABLE (grpc/grpc#36066). Our servers never
# send it (their INTERNAL details name the error and a request id), so it is a lost connection.
CORE_WRITE_FAILURE = "Internal error from Core"


def transient(exc: aio.AioRpcError) -> bool:
    """A failure that another attempt may not meet: the server was unreachable or went away."""
    code = exc.code()
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.INTERNAL and (exc.details() or "") == CORE_WRITE_FAILURE)


async def call_with_retry(
    attempt_fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str
) -> T:
    """Run ``attempt_fn`` again after UNAVAILABLE (or a lost connection reported as INTERNAL,
    see ``transient``), with backoff; other errors pass through.

    For calls whose whole request can be replayed (the channel's own retries stop once a
    response has started to arrive or the request outgrew its buffer).
    """
    first_failure: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            return await attempt_fn()
        except aio.AioRpcError as exc:
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            # The server's own hint (RetryInfo) wins where it asks for a longer wait.
            delay = max(policy.backoff(attempt), min(retry_delay(exc) or 0.0, policy.max_backoff_s))
            if not transient(exc) or policy.max_attempts <= 1 or now + delay - first_failure > policy.budget_s:
                raise
            log.warning(
                "unavailable; retrying",
                extra={"fields": {"call": what, "attempt": attempt, "delay_s": delay, "error": exc.details()}},
            )
            await asyncio.sleep(delay)


def retry_delay(exc: grpc.RpcError) -> float | None:
    """The wait a server asked for in google.rpc.RetryInfo (its trailing status details)."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_INFO_KEY and isinstance(value, bytes):
            return read_retry_delay(value)
    return None


async def unreachable(channels: dict[str, aio.Channel], services: dict[str, str],
                      timeout: float = 2.0) -> dict[str, str]:
    """Which of ``channels`` do not report their service (``services[name]``) SERVING, and why."""

    async def check(name: str) -> tuple[str, str]:
        try:
            reply = await health_pb2_grpc.HealthStub(channels[name]).Check(
                health_pb2.HealthCheckRequest(service=services[name]), timeout=timeout)
        except aio.AioRpcError as exc:
            # The channel retries health checks itself, so a service that is away runs out
            # the deadline rather than answering UNAVAILABLE.
            lost = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return name, "unreachable" if lost else exc.code().name
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return name, ""
        return name, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    results = await asyncio.gather(*(check(name) for name in channels))
    return {name: why for name, why in results if why}
