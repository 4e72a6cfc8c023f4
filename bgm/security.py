"""Who may call: an optional bearer token, and optional TLS / mutual TLS.

The token is checked in constant time by an interceptor on every method except health
and reflection, so that load balancers and Kubernetes probes need no secret. Tokens are
never logged.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from bgm.errors import drain_before_refusal
from bgm.settings import SettingsError

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


class TokenInterceptor(aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self.expected = token.encode()

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                # The scheme is case-insensitive (RFC 9110 section 11.1); the token is not.
                scheme, _, token = given.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES) or self._authorised(handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    message = "missing or invalid bearer token: send 'authorization: Bearer <token>' metadata"

    async def refuse_unary(request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    async def refuse_upload(requests: AsyncIterator[Any], context: aio.ServicerContext) -> None:
        await drain_before_refusal(requests)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_upload_stream(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
        await refuse_upload(requests, context)
        yield  # pragma: no cover - makes this an async generator

    if handler is None or handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse_unary)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_upload)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.stream_stream_rpc_method_handler(refuse_upload_stream)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {path}: {exc.strerror}") from None


def _check_pair(cert: str, key: str) -> None:
    """gRPC reports a key that does not match its certificate as "Failed to bind"; say what it is."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = "the key does not belong to the certificate" if "MISMATCH" in str(exc) else str(exc)
        raise SettingsError(f"TLS_CERT/TLS_KEY: {reason} ({cert}, {key})") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS when cert and key are set; mutual TLS (clients must present a certificate signed
    by ``client_ca``) when that is set too."""
    if not cert and not key:
        if client_ca:
            raise SettingsError("TLS_CLIENT_CA needs TLS_CERT and TLS_KEY too")
        return None
    if not (cert and key):
        raise SettingsError("set both TLS_CERT and TLS_KEY, or neither")
    pair = [(_read(key, "TLS_KEY"), _read(cert, "TLS_CERT"))]
    _check_pair(cert, key)
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "TLS_CLIENT_CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS to the server (trusting ``ca``, or the system roots when empty but a client
    certificate is given), with a client certificate for mutual TLS. None: plain channel."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise SettingsError("set both the client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA") if ca else None,
        private_key=_read(key, "TLS client key") if key else None,
        certificate_chain=_read(cert, "TLS client certificate") if cert else None,
    )


class _Bearer:
    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()), self.header)
        return aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                     details.wait_for_ready)


class _BearerUnaryUnary(_Bearer, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _BearerStreamStream(_Bearer, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def bearer_interceptors(token: str) -> list[aio.ClientInterceptor]:
    """Interceptors adding 'authorization: Bearer <token>' to every call of a channel. One per
    call kind: an aio channel files each interceptor under the first kind it matches."""
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    return [kind(token) for kind in kinds]
