"""Errors the server raises on purpose, and the one table that maps them to gRPC status codes.

Every layer of the server raises these; only the transport (servicer) turns them into a status,
through `status_of`. Messages say what was expected and what came.
"""

from __future__ import annotations

import grpc

# A status message travels in gRPC metadata, whose size is limited (a client refuses trailers
# past 16 KiB by default, and then reports that instead of the status): messages are cut here.
MAX_MESSAGE = 2000
_MAX_NAME = 100


def quoted(name: str) -> str:
    """A name the client sent, quoted for a message, cut short if it is long."""
    if len(name) <= _MAX_NAME:
        return repr(name)
    return f"{name[:_MAX_NAME]!r}... ({len(name)} characters)"


class ServeError(Exception):
    """Base class: an error whose message is safe and useful to show the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Seconds after which a retry is likely to succeed (sent as `retry-after-ms` metadata).
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidInput(ServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServeError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServeError):
    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(ServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InferenceFailed(ServeError):
    """The model raised while computing a batch; only that batch's requests see it."""

    code = grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client receives for `exc`."""
    if isinstance(exc, ServeError):
        message = str(exc)
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE]}... (cut from {len(message)} characters)"
        return exc.code, message
    # Anything unexpected is a bug of ours: say so without leaking internals.
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
