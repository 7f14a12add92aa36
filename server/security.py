"""TLS / mutual TLS from certificate files, and optional bearer-token authentication.

Tokens are compared in constant time; the health service stays open so probes need no secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from rnnserve.server.settings import Settings

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {what} {path}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS when a certificate is set; mutual TLS when a client CA is set."""
    if not settings.tls_cert:
        if settings.tls_key or settings.tls_client_ca:
            raise SystemExit("--tls-key / --tls-client-ca need --tls-cert")
        return None
    if not settings.tls_key:
        raise SystemExit("--tls-cert needs --tls-key")
    pair = (_read(settings.tls_key, "TLS key"), _read(settings.tls_cert, "TLS certificate"))
    client_ca = _read(settings.tls_client_ca, "client CA") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def load_tokens(settings: Settings) -> list[bytes]:
    tokens = [t.strip() for t in settings.tokens.split(",") if t.strip()]
    if settings.token_file:
        for line in _read(settings.token_file, "token file").decode().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    if (settings.token_file or settings.tokens) and not tokens:
        raise SystemExit("token authentication is on but no tokens were given")
    return [t.encode() for t in tokens]


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[bytes]) -> None:
        self._tokens = tokens

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                if scheme.lower() != "bearer":
                    return False
                presented = token.strip().encode()
                # Compare against every token so timing does not tell which one nearly matched.
                matches = [hmac.compare_digest(presented, t) for t in self._tokens]
                return any(matches)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        return _refusal(handler)


_MESSAGE = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
        yield  # unreachable: makes this an async generator, as streaming handlers are

    serdes = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serdes)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **serdes)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **serdes)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **serdes)


def token_interceptor(settings: Settings) -> TokenInterceptor:
    return TokenInterceptor(load_tokens(settings))
