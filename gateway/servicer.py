"""The Gateway gRPC servicer: Remix and Analyze."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from grpc import aio

from bgm import cache, limits, logs, scratch, vocab
from bgm.chunks import Spool, StreamLimits, read_config, spool_payload
from bgm.client import RetryPolicy, make_channel, unreachable
from bgm.errors import ConcurrencyLimiter, InvalidInput, NotReady
from bgm.security import channel_credentials
from bgm.server import ModelServicer
from bgm.settings import ServerSettings
from bgm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.options import validate as validate_options
from gateway.pipeline import Remix, Stubs
from gateway.settings import GatewaySettings

log = logs.get("bgm.gateway")
SERVICES_BY_NAME = {service.name: service for service in vocab.SERVICES}
WATCH_INTERVAL_S = 2.0


class LocalServices(Protocol):
    """The four services run in this process (``services.embedded.EmbeddedServices``): the
    gateway starts them in ``load`` when no addresses are set, and stops them in ``close``."""

    async def start(self) -> dict[str, str]: ...

    async def stop(self, grace: float = 2.0) -> None: ...


class GatewayServicer(ModelServicer, gateway_pb2_grpc.GatewayServicer):
    service_name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name

    def __init__(self, gateway: GatewaySettings, server: ServerSettings, local: LocalServices | None = None) -> None:
        super().__init__()
        self.settings = gateway
        self.server = server
        self.limiter = ConcurrencyLimiter(server.max_concurrency, "the gateway")
        self.uploads = ConcurrencyLimiter(server.max_uploads, "the gateway's uploads")
        self.stream = StreamLimits.of(server, vocab.GATEWAY)
        self.retry = RetryPolicy(max_attempts=gateway.retry_attempts, budget_s=gateway.retry_budget_s)
        self.local = local
        self.audio_cache = cache.ArrayCache(gateway.cache_dir, 0, gateway.cache_mb * vocab.MIB)
        self.channels: dict[str, aio.Channel] = {}
        self.stubs: Stubs | None = None
        self.watch: asyncio.Task[None] | None = None
        self.recheck: asyncio.Future[None] | None = None
        self.down: dict[str, str] = {}
        self.reachable = asyncio.Event()

    def add_to_server(self, server: aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self, server)

    async def load(self) -> None:
        """Connect to the four services (starting them in-process in embedded mode); ready
        once each reports SERVING, however long that takes. A watch keeps checking them."""
        s = self.settings
        if s.embedded:
            if self.local is None:
                raise RuntimeError("no service addresses are set: set BGM_GATEWAY_STT_ADDRESS, _EMOTION_, _MUSIC_ "
                                   "and _MIXER_ADDRESS, or run all five in one process with `bgm serve all`")
            addresses = await self.local.start()
        else:
            addresses = {service.name: getattr(s, f"{service.name}_address") for service in vocab.BACKEND_SERVICES}
        credentials = None if s.embedded else channel_credentials(s.services_ca, s.services_cert, s.services_key)
        token = "" if s.embedded else s.services_token
        self.channels = {name: make_channel(target, max_message_bytes=self.server.max_message_bytes,
                                            retry=self.retry, credentials=credentials, token=token)
                         for name, target in addresses.items()}
        self.stubs = Stubs.connect(self.channels)
        self.watch = asyncio.create_task(self._watch())
        await self.reachable.wait()
        self.ready = True

    async def _watch(self) -> None:
        """Check the services every WATCH_INTERVAL_S: the gateway is ready only while all
        four are SERVING, and recovers by itself when one comes back."""
        while True:
            await self._check()
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _check(self) -> None:
        down = await unreachable(self.channels, {n: SERVICES_BY_NAME[n].grpc_name for n in self.channels})
        if down != self.down:
            # While starting, services that are still loading are expected, not a warning.
            level = log.warning if down and self.reachable.is_set() else log.info
            level("services " + ("unreachable" if down else "all reachable"), extra={"fields": {"down": down}})
        self.down = down
        if not down:
            self.reachable.set()
        if self.reachable.is_set() and self.ready != (not down):
            self.ready = not down
            if self.on_health is not None:
                await self.on_health(self.ready)

    async def confirm_ready(self) -> None:
        """Refuse a job only on a fresh look: the watch's last verdict may be a check that ran
        out its deadline while this process was busy (an embedded remix holding the GIL)."""
        if not self.ready and self.reachable.is_set():
            # Callers that arrive together share one look (a refusal waits out its deadline).
            if self.recheck is None or self.recheck.done():
                self.recheck = asyncio.ensure_future(self._check())
            await asyncio.shield(self.recheck)
        self.require_ready()

    def require_ready(self) -> None:
        if not self.ready:
            waiting = "; ".join(f"{name}: {why}" for name, why in self.down.items()) or "starting"
            raise NotReady(f"the gateway cannot reach every service yet ({waiting}); try again shortly")

    async def close(self) -> None:
        self.ready = False
        for task in (self.watch, self.recheck):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for channel in self.channels.values():
            await channel.close()
        if self.local is not None and self.settings.embedded:
            await self.local.stop()

    async def Remix(
        self, request_iterator: AsyncIterator[gateway_pb2.RemixRequest], context: aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.RemixResponse]:
        async for message in self._run(request_iterator, analyze_only=False):
            yield message

    async def Analyze(
        self, request_iterator: AsyncIterator[gateway_pb2.RemixRequest], context: aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.RemixResponse]:
        async for message in self._run(request_iterator, analyze_only=True):
            yield message

    async def _run(
        self, request_iterator: AsyncIterator[gateway_pb2.RemixRequest], analyze_only: bool
    ) -> AsyncIterator[gateway_pb2.RemixResponse]:
        await self.confirm_ready()
        assert self.stubs is not None
        # A busy gateway refuses before the upload; the slot itself is taken once the video is
        # in, so clients that open a stream and idle (or upload slowly) never block the others.
        self.limiter.check()
        with scratch.workdir("gw", self.settings.tmp_dir) as tmp:
            with self.uploads:
                options, rest = await read_config(request_iterator, "options", "video", self.stream)
                validate_options(options)
                # The options are accepted: a client may wait for this before sending the video,
                # so that a refusal never costs an upload.
                yield gateway_pb2.RemixResponse(progress=common_pb2.Progress(
                    stage=common_pb2.STAGE_UPLOAD, fraction=0.0, message="options accepted; send the video"))
                suffix = limits.file_suffix(options.filename)
                with Spool(self.settings.max_upload_bytes, "the upload", tmp, suffix) as upload:
                    await spool_payload(rest, upload, "options", "video")
                    if upload.size == 0:
                        raise InvalidInput("no video was sent after the options message")
                    video = upload.finish()
                    video = video.rename(video.with_name(f"upload{suffix}"))  # outlives the spool
            with self.limiter:
                async for message in self._remix(options, video, upload.size, Path(tmp), analyze_only):
                    yield message

    async def _remix(self, options: gateway_pb2.RemixOptions, video: Path, size: int, tmp: Path,
                     analyze_only: bool) -> AsyncIterator[gateway_pb2.RemixResponse]:
        """Run the stages on an uploaded video, yielding their progress and results."""
        assert self.stubs is not None
        queue: asyncio.Queue[gateway_pb2.RemixResponse | None] = asyncio.Queue(maxsize=64)
        job = Remix(self.stubs, options, video, tmp, queue.put,
                    self.settings.stage_timeout_s, self.retry, self.server.max_duration_s, self.audio_cache)
        yield gateway_pb2.RemixResponse(progress=common_pb2.Progress(
            stage=common_pb2.STAGE_UPLOAD, fraction=1.0, message=f"received {size} bytes"))

        async def drive() -> None:
            try:
                await job.run(analyze_only)
            finally:
                await queue.put(None)

        task = asyncio.create_task(drive())
        try:
            while (message := await queue.get()) is not None:
                yield message
            await task  # re-raises a stage failure
        finally:
            if not task.done():  # the client went away: stop every stage
                task.cancel()
                while not task.done():
                    while not queue.empty():
                        queue.get_nowait()
                    await asyncio.sleep(0.01)
