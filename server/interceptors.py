"""Bytes that do not parse as the request message get INVALID_ARGUMENT naming the expected message,
instead of gRPC's default UNKNOWN status with a Python exception name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from rnnserve.server.errors import InvalidInput


class _Malformed:
    __slots__ = ("error", "expected")

    def __init__(self, expected: str, error: Exception) -> None:
        self.expected = expected
        self.error = error

    def message(self) -> str:
        return f"malformed request: the bytes do not parse as {self.expected} ({self.error})"


def _safe(deserializer: Callable[[bytes], Any], expected: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return _Malformed(expected, exc)

    return parse


def _expected_name(method: str) -> str:
    service, _, name = method.lstrip("/").partition("/")
    return f"the request of {service}/{name}"


# Told of a malformed unary request (full method name, context, message) before it is refused;
# returns the trailing metadata to send with the refusal. Streams refuse inside their handler.
OnMalformed = Callable[[str, grpc.aio.ServicerContext, str], Sequence[tuple[str, str]]]


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once (the registered handlers do not change)."""

    def __init__(self, on_malformed: OnMalformed | None = None) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._on_malformed = on_malformed

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[details.method] = _wrap(
                handler, details.method, self._on_malformed
            )
        return wrapped


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, on_malformed: OnMalformed | None
) -> grpc.RpcMethodHandler:
    if handler.request_deserializer is None:
        return handler
    expected = _expected_name(method)
    parse = _safe(handler.request_deserializer, expected)
    serdes = dict(request_deserializer=parse, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                message = request.message()
                trailer = on_malformed(method, context, message) if on_malformed else ()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message, tuple(trailer))
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **serdes)
    if handler.stream_stream:
        stream = handler.stream_stream

        async def stream_handler(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for response in stream(_checked(requests), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_handler, **serdes)
    return handler


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            raise InvalidInput(request.message())
        yield request
