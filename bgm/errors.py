"""Exceptions that carry their gRPC status, and the one interceptor that maps them.

Servicers raise these (or anything else); the interceptor turns them into statuses:
InvalidInput -> INVALID_ARGUMENT, NotReady -> UNAVAILABLE, Overloaded -> RESOURCE_EXHAUSTED,
anything unexpected -> INTERNAL with a short message (the traceback goes to the log only).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from bgm import logs, processes

log = logs.get("bgm.errors")


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request cannot be served as sent; sending it again will not help."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotReady(ServiceError):
    """The model is not loaded yet (or a dependency is down); try again later."""

    code = grpc.StatusCode.UNAVAILABLE
    retry_after_s = 2.0


class Overloaded(ServiceError):
    """Too many requests at once; try again after ``retry_after_s``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class IdleStream(ServiceError):
    """The client stopped sending (or sends too slowly); the stream is dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unsupported(ServiceError):
    """A valid request for something this deployment does not offer (e.g. a backend not installed)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConcurrencyLimiter:
    """Admits at most ``limit`` requests at once and refuses the rest at once (no queueing)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.active = 0

    def check(self) -> None:
        """Refuse now if every slot is taken, without taking one (before an upload, so that a
        busy service does not cost the client the upload; the slot is taken when work starts)."""
        if self.active >= self.limit:
            raise Overloaded(f"{self.what} is busy with {self.active} request(s), its limit")

    def __enter__(self) -> ConcurrencyLimiter:
        self.check()
        self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.active -= 1


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("disk full", exc_info=exc)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server's disk is full; try again later or send a smaller file"
    rid = logs.request_id.get()
    log.error("unhandled error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); request id {rid}"


def _request_id(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 64:
            return value
    return uuid.uuid4().hex[:16]


class ErrorInterceptor(aio.ServerInterceptor):
    """Sets the request id for logs and maps every exception a handler raises to a status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, uploads=True),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, method, uploads=True),
            handler.request_deserializer,
            handler.response_serializer,
        )


# Where gRPC's rich error model carries details (grpcio-status reads it the same way).
RETRY_INFO_KEY = "grpc-status-details-bin"


def retry_trailers(code: grpc.StatusCode, message: str, retry_after_s: float) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying google.rpc.RetryInfo, so that clients can wait as long as asked."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(retry_after_s * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return ((RETRY_INFO_KEY, status.SerializeToString()),)


def read_retry_delay(details: bytes) -> float | None:
    """The RetryInfo delay in a serialized google.rpc.Status, if it carries one."""
    status = status_pb2.Status.FromString(details)
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def _fail(context: aio.ServicerContext, method: str, started: float, exc: BaseException) -> None:
    code, message = _status_for(exc)
    log.info(
        "rpc failed",
        extra={"fields": {"method": method, "code": code.name, "error": message,
                          "duration_s": round(time.monotonic() - started, 3)}},
    )
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(exc, ServiceError) and retry_after is not None:
        await context.abort(code, message, retry_trailers(code, message, float(retry_after)))
    await context.abort(code, message)


# Probes arrive every few seconds: logged at DEBUG so they do not drown the real traffic.
_QUIET = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _log_ok(method: str, started: float) -> None:
    level = logging.DEBUG if method.startswith(_QUIET) else logging.INFO
    log.log(level, "rpc ok", extra={"fields": {"method": method, "duration_s": round(time.monotonic() - started, 3)}})


FIRST_MESSAGE_WAIT_S = 3.0
NEXT_MESSAGE_WAIT_S = 0.25
DRAIN_BUDGET_S = 10.0


async def drain_before_refusal(requests: AsyncIterator[Any], first_taken: bool = False) -> None:
    """Reads and drops what the caller is still sending, until it stops (or pauses), before a
    refusal is sent.

    A refusal that overtakes one of the caller's writes reaches grpc's asyncio client as
    "INTERNAL: Internal error from Core" instead of the refusal (grpc/grpc#36066), which no
    client retries and no person can act on: 2-6 % of refusals before the first message on
    fresh connections, 67 of 100 refusals of an upload over the size limit. So the refusal
    waits for the first message (up to FIRST_MESSAGE_WAIT_S), then for the upload to end or
    to pause for NEXT_MESSAGE_WAIT_S, for DRAIN_BUDGET_S at most. Nothing is kept."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_BUDGET_S
    wait = NEXT_MESSAGE_WAIT_S if first_taken else FIRST_MESSAGE_WAIT_S
    with contextlib.suppress(Exception):  # the end of the stream, a pause, or a broken stream
        while (left := deadline - loop.time()) > 0:
            await asyncio.wait_for(anext(requests), min(wait, left))
            wait = NEXT_MESSAGE_WAIT_S


class _Uploaded:
    """The request stream, noting whether the handler has taken a message from it."""

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self.requests = requests
        self.taken = False

    def __aiter__(self) -> _Uploaded:
        return self

    async def __anext__(self) -> Any:
        message = await anext(self.requests)
        self.taken = True
        return message

    async def before_refusal(self) -> None:
        await drain_before_refusal(self.requests, self.taken)


def _wrap_unary(behavior: Callable[..., Any], method: str, uploads: bool = False) -> Callable[..., Any]:
    async def handle(request: Any, context: aio.ServicerContext) -> Any:
        token = logs.request_id.set(_request_id(context))
        started = time.monotonic()
        if uploads:
            request = _Uploaded(aiter(request))
        try:
            with processes.owned_by_request():
                response = await behavior(request, context)
            _log_ok(method, started)
            return response
        except (asyncio.CancelledError, aio.AbortError):
            raise
        except Exception as exc:
            if uploads:
                await request.before_refusal()
            await _fail(context, method, started, exc)
        finally:
            logs.request_id.reset(token)

    return handle


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str,
                 uploads: bool = False) -> Callable[..., Any]:
    async def handle(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        token = logs.request_id.set(_request_id(context))
        started = time.monotonic()
        if uploads:
            request = _Uploaded(aiter(request))
        try:
            with processes.owned_by_request():
                async for response in behavior(request, context):
                    yield response
            _log_ok(method, started)
        except (asyncio.CancelledError, aio.AbortError):
            raise
        except Exception as exc:
            if uploads:
                await request.before_refusal()
            await _fail(context, method, started, exc)
        finally:
            _reset(token)

    return handle


def _reset(token: Any) -> None:
    # A streaming handler may be resumed in a copy of the context it started in.
    with contextlib.suppress(ValueError):
        logs.request_id.reset(token)
