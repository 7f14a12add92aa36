"""What the sync and asyncio clients share: channel options, TLS, tokens, retry policy, and the
request messages."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
from numpy.typing import ArrayLike

from rnnserve.client.results import output_mode
from rnnserve.client.tensors import to_tensor
from rnnserve.v1 import inference_pb2 as pb

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # gRPC waits longer and longer between attempts to reconnect (up to 120 s), and meanwhile
    # fails every call at once: a client kept through a server restart of a minute stayed
    # unusable for ~20 s after the server was back. At most 2 s between attempts here.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE, RESOURCE_EXHAUSTED and CANCELLED with jittered exponential backoff, at
    most `max_attempts` tries and never past the call's timeout. A call this client did not cancel
    comes back CANCELLED when an overloaded server sheds it before any handler ran (gRPC does so
    beyond the server's `--max-pending-rpcs`). RESOURCE_EXHAUSTED is retried only when the server
    says when to (`retry-after-ms`): without it, the request itself is over a limit (too many
    sequences or timesteps, too big a message) and would be refused again."""

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.CANCELLED,
        }
    )

    def allows(self, err: grpc.RpcError) -> bool:
        code = err.code()
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and _hint(err) is None:
            return False
        return code in self.codes

    def delays(self) -> Iterator[float]:
        backoff = self.initial_backoff
        for _ in range(self.max_attempts - 1):
            yield random.uniform(0, backoff)
            backoff = min(backoff * self.multiplier, self.max_backoff)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


def for_opening(policy: RetryPolicy) -> RetryPolicy:
    """Opening a session is not idempotent: after UNAVAILABLE the server may have created it and
    the answer been lost, and a retry would leave that one orphaned (until its idle TTL) or
    collide with the id asked for. Only refusals that prove nothing was created are retried."""
    return replace(policy, codes=policy.codes - {grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class TLS:
    """Server CA to trust (None: system roots), and a client certificate for mutual TLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # override the name checked in the server's certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _hint(err: grpc.RpcError) -> float | None:
    """The server's `retry-after-ms` hint, in seconds."""
    for key, value in getattr(err, "trailing_metadata", lambda: None)() or ():
        if key == "retry-after-ms":
            try:
                return float(value) / 1000.0
            except ValueError:
                return None
    return None


def retry_delay(err: grpc.RpcError, backoff: float) -> float:
    """The backoff, or the server's `retry-after-ms` hint when it asks for longer."""
    return max(backoff, _hint(err) or 0.0)


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def as_sequence(array: ArrayLike) -> np.ndarray:
    """Floats travel as float32 features, integers as int32 token ids (int64 if they need it)."""
    x = np.asarray(array)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind in "iu":
        if x.size and (x.min() < np.iinfo(np.int32).min or x.max() > np.iinfo(np.int32).max):
            return x.astype(np.int64, copy=False)
        return x.astype(np.int32, copy=False)
    raise TypeError(f"sequences must hold floats or integer ids, got dtype {x.dtype}")


def predict_request(
    model: str,
    sequences: Sequence[ArrayLike],
    *,
    version: int,
    output: str,
    top_k: int,
    outputs: Sequence[str] | None,
) -> pb.PredictRequest:
    if isinstance(sequences, np.ndarray):  # one [T, D] array would go as T sequences of [D]
        raise TypeError(
            "sequences must be a list of arrays, one per sequence: predict(model, [x]) or "
            "predict_one(model, x) for one"
        )
    if isinstance(outputs, str):  # one name, not its letters
        outputs = [outputs]
    return pb.PredictRequest(
        model_name=model,
        model_version=version,
        sequences=[to_tensor(as_sequence(s)) for s in sequences],
        output_mode=output_mode(output),
        top_k=top_k,
        output_names=list(outputs or ()),
    )


def check_open(is_open: bool, session_id: str) -> None:
    """A session's stream that has ended takes no more chunks: say so, and how to go on."""
    if is_open:
        return
    if not session_id:  # only an asyncio session exists before it has opened (or if that failed)
        raise RuntimeError(
            "the session is not open: open it with `async with client.session(...) as s:` or "
            "`await s.open()`"
        )
    raise RuntimeError(
        f"the stream of session {session_id} has ended; resume the session "
        "with client.session(session_id=...)"
    )


def chunk_timeout(session_id: str, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"no answer to the chunk within {timeout:g}s; the stream of session {session_id} has "
        "ended, resume the session with client.session(session_id=...) to go on from where the "
        "server is"
    )


def open_timeout(timeout: float) -> TimeoutError:
    return TimeoutError(
        f"no answer to the session's open within {timeout:g}s; the stream has ended (a session "
        "the server may have created meanwhile ends with its idle TTL)"
    )


def one_at_a_time(session_id: str) -> RuntimeError:
    return RuntimeError(
        f"another send() of session {session_id} is waiting for its answer: a session takes its "
        "chunks one at a time, in order"
    )


def stream_ended(session_id: str) -> RuntimeError:
    named = f" of session {session_id}" if session_id else ""
    return RuntimeError(f"the server ended the stream{named} without an answer")


def close_timeout(session_id: str, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"the server did not confirm the close of session {session_id} within {timeout:g}s; the "
        "stream has ended, and the session may still be on the server: client.close_session() "
        "ends it, or its idle TTL will"
    )


def chunk(data: ArrayLike, offset: int | None) -> pb.Chunk:
    message = pb.Chunk(data=to_tensor(as_sequence(data)))
    if offset is not None:
        message.offset = offset
    return message
