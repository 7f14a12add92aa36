"""TLS / mutual TLS from certificate files, and optional bearer-token authentication.

Tokens are compared in constant time; the health service stays open so probes need no secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from rnnserve.server.settings import CannotStart, Settings

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CannotStart(f"cannot read {what} {path}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS when a certificate is set; mutual TLS when a client CA is set."""
    if not settings.tls_cert:
        if settings.tls_key or settings.tls_client_ca:
            raise CannotStart("--tls-key / --tls-client-ca need --tls-cert")
        return None
    if not settings.tls_key:
        raise CannotStart("--tls-cert needs --tls-key")
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
        raise CannotStart("token authentication is on but no tokens were given")
    return [t.encode() for t in tokens]


# Told of each refusal (full method name, context, message, status); returns the trailing
# metadata to send with it.
OnRefused = Callable[
    [str, grpc.aio.ServicerContext, str, grpc.StatusCode], tuple[tuple[str, str], ...]
]


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[bytes], on_refused: OnRefused | None = None) -> None:
        self._tokens = tokens
        self._on_refused = on_refused

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
        return _refusal(handler, details.method, self._on_refused)


_MESSAGE = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def _refusal(
    handler: grpc.RpcMethodHandler, method: str, on_refused: OnRefused | None
) -> grpc.RpcMethodHandler:
    async def abort(context: grpc.aio.ServicerContext) -> None:
        code = grpc.StatusCode.UNAUTHENTICATED
        trailer = on_refused(method, context, _MESSAGE, code) if on_refused else ()
        await context.abort(code, _MESSAGE, trailing_metadata=trailer)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context)
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


def token_interceptor(settings: Settings, on_refused: OnRefused | None = None) -> TokenInterceptor:
    return TokenInterceptor(load_tokens(settings), on_refused)
