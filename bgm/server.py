"""Server bootstrap shared by every service.

``start_server`` binds any port (0 picks a free one, as tests do) and returns it, with the
standard health service (overall liveness "" is SERVING at once; each servicer's own name
stays NOT_SERVING until its model has loaded) and reflection. ``serve`` is the blocking
entry point of ``python -m services.X``: settings from the environment, JSON logs, and a
graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bgm import logs, memory, scratch
from bgm.errors import ErrorInterceptor, NotReady
from bgm.security import TokenInterceptor, server_credentials
from bgm.settings import ServerSettings, SettingsError, server_settings

log = logs.get("bgm.server")


class Servicer(Protocol):
    """What ``start_server`` needs from a service implementation."""

    #: Full gRPC service name, e.g. "bgm.v1.SpeechToText"; also its health-check name.
    service_name: str

    def add_to_server(self, server: aio.Server) -> None: ...

    async def load(self) -> None:
        """Load models; the service reports SERVING once this returns."""

    async def close(self) -> None:
        """Release what ``load`` took (called after the server stopped)."""


class ModelServicer:
    """Base for servicers whose model loads after the port is open."""

    service_name = ""

    def __init__(self) -> None:
        self.ready = False
        # Set by start_server: reports a change of readiness after the model has loaded
        # (a gateway whose services went away is not ready, and is again when they return).
        self.on_health: Callable[[bool], Awaitable[None]] | None = None

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady(f"{self.service_name} is still loading its model; try again shortly")

    async def load(self) -> None:
        self.ready = True

    async def close(self) -> None:
        self.ready = False


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    servicers: Sequence[Servicer]
    loading: list[asyncio.Task[None]] = field(default_factory=list)
    load_errors: dict[str, BaseException] = field(default_factory=dict)
    health_server: aio.Server | None = None  # plaintext, health only (ServerSettings.health_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_loading(self) -> None:
        if not self.loading:
            self.loading = [asyncio.create_task(_load(s, self)) for s in self.servicers]

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every model loaded; raise the first load error if one failed."""
        if self.loading:
            await asyncio.wait_for(asyncio.gather(*self.loading, return_exceptions=True), timeout)
        if self.load_errors:
            name, exc = next(iter(self.load_errors.items()))
            raise RuntimeError(f"{name} failed to load: {exc}") from exc

    async def stop(self, grace: float | None = 5.0) -> None:
        for task in self.loading:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.server.stop(grace)
        for servicer in self.servicers:
            await servicer.close()


def server_options(max_message_bytes: int, connection_age_s: float = 300.0) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Ping every minute and drop a connection whose client does not answer in 20 s, so
        # dead clients are noticed; close connections left idle for 10 minutes.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_connection_idle_ms", 600_000),
        # So that replicas added later get traffic (ServerSettings.connection_age_s).
        ("grpc.max_connection_age_ms", int(connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", 4 * 3600 * 1000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


async def start_server(
    servicers: Sequence[Servicer],
    settings: ServerSettings,
    *,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    load_models: bool = True,
) -> RunningServer:
    """Start a server for ``servicers`` and begin loading their models in the background
    (or, with ``load_models=False``, when ``RunningServer.start_loading`` is called)."""
    memory.tune_allocator()  # before the models load and the worker threads start
    await asyncio.to_thread(scratch.sweep, settings.tmp_dir)  # may remove gigabytes: off the loop
    if credentials is None:
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    guards: list[aio.ServerInterceptor] = [TokenInterceptor(settings.auth_token)] if settings.auth_token else []
    server = aio.server(
        interceptors=[*guards, *interceptors, ErrorInterceptor()],
        options=server_options(settings.max_message_bytes, settings.connection_age_s),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for servicer in servicers:
        servicer.add_to_server(server)
        if isinstance(servicer, ModelServicer):
            servicer.on_health = functools.partial(_report, health_servicer, servicer.service_name)
    names = [s.service_name for s in servicers]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    address = f"{settings.host}:{settings.port}"
    port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    running = RunningServer(server=server, port=port, health=health_servicer, servicers=servicers,
                            health_server=await _health_server(settings, health_servicer))
    if load_models:
        running.start_loading()
    log.info("listening", extra={"fields": {"address": f"{settings.host}:{port}", "services": names}})
    return running


async def _health_server(settings: ServerSettings, health_servicer: health.aio.HealthServicer) -> aio.Server | None:
    """Kubernetes' gRPC probes speak plaintext only: with TLS (or a token) on the service's
    port, the same health states are also served alone on ``health_port``."""
    if not settings.health_port:
        return None
    server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.health_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"could not bind the health port {address}")
    await server.start()
    return server


async def _report(health_servicer: health.aio.HealthServicer, name: str, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set(name, status)


async def _load(servicer: Servicer, running: RunningServer) -> None:
    name = servicer.service_name
    try:
        await servicer.load()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        running.load_errors[name] = exc
        log.error("model failed to load", exc_info=exc, extra={"fields": {"servicer": name}})
        return
    await _report(running.health, name, True)
    log.info("ready", extra={"fields": {"servicer": name}})


def serve(service: str, make_servicers: Callable[[], Sequence[Servicer]]) -> None:
    """Blocking entry point: run until SIGTERM/SIGINT, then stop gracefully.

    A bad setting, a port that cannot be bound or a model that fails to load ends the
    process with a one-line reason and a non-zero code, so that restart policies and
    liveness probes act instead of a server that stays up and can never serve.
    """
    prefix = f"BGM_{service.upper()}"
    try:
        settings = server_settings(service)
        logs.configure(service, settings.log_level)
        servicers = make_servicers()
        asyncio.run(_serve(settings, servicers))
    except SettingsError as exc:
        message = str(exc)
        named = message if message.startswith("BGM_") else f"{prefix}_{message}"
        raise SystemExit(f"bgm {service}: bad setting: {named}") from None
    except StartupFailed as exc:
        raise SystemExit(f"bgm {service}: {exc}") from None


class StartupFailed(Exception):
    """The server could not start or its model could not load."""


async def _serve(settings: ServerSettings, servicers: Sequence[Servicer]) -> None:
    try:
        running = await start_server(servicers, settings)
    except RuntimeError as exc:
        raise StartupFailed(str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waiting = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(running.wait_ready())]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    failure = None
    if waiting[1] in done and waiting[1].exception() is not None:
        failure = waiting[1].exception()
    elif waiting[1] in done:
        await stop.wait()
    for task in waiting:
        task.cancel()
    log.info("shutting down", extra={"fields": {"grace_s": 0 if failure else settings.grace_s}})
    await running.stop(0 if failure else settings.grace_s)
    if failure is not None:
        raise StartupFailed(str(failure))
