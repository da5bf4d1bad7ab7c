"""Transport security: bearer-token authentication and TLS server credentials."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

# Load balancers and orchestrators probe health without credentials.
_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless it carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _denying_handler(handler)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                presented = value.encode() if isinstance(value, str) else bytes(value)
                # Constant-time comparison: no timing oracle on the token.
                return hmac.compare_digest(presented, self._expected)
        return False


_DENIAL = "missing or wrong bearer token (authorization metadata)"
_FIRST_MESSAGE_WAIT_S = 1.0


async def _deny(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIAL)


async def _deny_stream(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> None:
    """Refuse a client-streaming call after taking its first message.

    A grpcio aio client whose write fails because the call already ended reports
    INTERNAL instead of the server's status (grpc/grpc#36066). Edges write their
    handshake first, so consuming it before aborting lets them see UNAUTHENTICATED.
    """
    with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration, grpc.RpcError):
        await asyncio.wait_for(anext(aiter(requests)), _FIRST_MESSAGE_WAIT_S)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIAL)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that refuses the call."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny_stream)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny)
    return grpc.unary_unary_rpc_method_handler(_deny)


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """TLS credentials from PEM files (certificate chain and private key)."""
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
