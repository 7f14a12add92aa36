"""Blocking client.

```python
from rnnserve.client import Client

with Client("127.0.0.1:8500") as client:
    [p] = client.predict("japanese_vowels", [x], top_k=3)   # x: [T, 12] float array
    print(p.output.label)
    with client.session("vowels_stream") as s:
        for part in np.array_split(long_series, 20):
            print(s.send(part).output.step_classes)
```
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import ArrayLike

from rnnserve.client.connection import (
    CHANNEL_OPTIONS,
    DEFAULT_RETRY,
    NO_RETRY,
    TLS,
    RetryPolicy,
    check_open,
    chunk,
    chunk_timeout,
    close_timeout,
    for_opening,
    metadata,
    one_at_a_time,
    open_timeout,
    predict_request,
    remaining,
    retry_delay,
    stream_ended,
)
from rnnserve.client.results import (
    ModelInfo,
    OutputMode,
    Prediction,
    SessionInfo,
    StepResult,
    model_info,
    output_mode,
    prediction,
    session_info,
    step_result,
)
from rnnserve.client.watchdog import WATCHDOG
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

T = TypeVar("T")


class Client:
    """A blocking client of one server (`target`: host:port). `timeout` is each call's deadline
    in seconds (None: no deadline) unless the call is given its own; calls the server refused
    for a passing reason (UNAVAILABLE, a shed call, a full queue that says when to come back) are
    retried within it by `retry`. Failures raise `grpc.RpcError` (its `code()` and `details()`
    say what was expected), and a session's own waits `TimeoutError`. Thread-safe, except
    that one `Session` takes its chunks one at a time."""

    def __init__(
        self,
        target: str = "127.0.0.1:8500",
        *,
        tls: TLS | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + tls.options()
            self.channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._metadata = metadata(token)
        self.timeout = timeout
        self.retry = retry
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()  # their streams end on close
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the streams of sessions still open end (the sessions stay)."""
        self._closed = True
        for session in list(self._sessions):
            session._abort()
        self.channel.close()

    def _call(
        self, method: Callable[..., T], request: Any, timeout: float | None, retry: RetryPolicy
    ) -> T:
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = retry.delays()
        while True:
            try:
                return method(request, timeout=remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as err:
                delay = next(delays, None)
                delay = None if delay is None else retry_delay(err, delay)
                left = remaining(deadline)
                if not retry.allows(err) or delay is None or (left is not None and left <= delay):
                    raise
                if self._closed:  # cancelled by our own close(), not shed by the server
                    raise
                time.sleep(delay)

    # ---- inference ----

    def predict(
        self,
        model: str,
        sequences: Sequence[ArrayLike],
        *,
        version: int = 0,
        output: OutputMode = "default",
        top_k: int = 0,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[Prediction]:
        """One prediction per sequence, in order; each is [T, D] floats or [T] token ids."""
        request = predict_request(
            model, sequences, version=version, output=output, top_k=top_k, outputs=outputs
        )
        response = self._call(self.stub.Predict, request, timeout, self.retry)
        return [prediction(r) for r in response.results]

    def predict_one(self, model: str, sequence: ArrayLike, **kwargs: Any) -> Prediction:
        return self.predict(model, [sequence], **kwargs)[0]

    def metadata(self, model: str, version: int = 0, *, timeout: float | None = None) -> ModelInfo:
        request = pb.GetModelMetadataRequest(model_name=model, model_version=version)
        return model_info(self._call(self.stub.GetModelMetadata, request, timeout, self.retry))

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout, self.retry)

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> bool:
        """True when the server (or the model named `service`) is SERVING, False when it is
        NOT_SERVING (draining, or the model not loaded). Raises `grpc.RpcError` when there is no
        answer (UNAVAILABLE: nothing listens there) or the server knows no such model
        (NOT_FOUND)."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request, timeout, NO_RETRY)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    # ---- sessions ----

    def session(
        self,
        model: str = "",
        *,
        version: int = 0,
        session_id: str = "",
        output: OutputMode = "both",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> Session:
        """A streaming session over one gRPC stream; pass `session_id` to resume one. `timeout`
        is a deadline for the whole stream (None: none); each chunk waits at most the client's
        timeout for its answer (`send(timeout=)`), and so does the open."""
        return Session(self, model, version, session_id, output, top_k, timeout)

    def open_session(
        self,
        model: str,
        *,
        version: int = 0,
        session_id: str = "",
        timeout: float | None = None,
    ) -> SessionInfo:
        request = pb.OpenSessionRequest(
            model_name=model, model_version=version, session_id=session_id
        )
        retry = for_opening(self.retry)
        return session_info(self._call(self.stub.OpenSession, request, timeout, retry))

    def step(
        self,
        session_id: str,
        data: ArrayLike,
        *,
        offset: int | None = None,
        output: OutputMode = "both",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> StepResult:
        """Unary session step. With `offset`, a retried chunk is never applied twice."""
        request = pb.StepSessionRequest(
            session_id=session_id,
            chunk=chunk(data, offset),
            output_mode=output_mode(output),
            top_k=top_k,
        )
        retry = self.retry if offset is not None else NO_RETRY
        return step_result(self._call(self.stub.StepSession, request, timeout, retry))

    def close_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        request = pb.CloseSessionRequest(session_id=session_id)
        return session_info(self._call(self.stub.CloseSession, request, timeout, NO_RETRY))

    def export_session(
        self, session_id: str, *, remove: bool = False, timeout: float | None = None
    ) -> pb.SessionState:
        request = pb.ExportSessionRequest(session_id=session_id, remove=remove)
        return self._call(self.stub.ExportSession, request, timeout, NO_RETRY)

    def import_session(
        self, state: pb.SessionState, *, timeout: float | None = None
    ) -> SessionInfo:
        return session_info(self._call(self.stub.ImportSession, state, timeout, NO_RETRY))


class Session:
    """One session on one bidirectional stream. Use as a context manager: leaving the block
    normally closes the session; leaving it with an exception (or after an error in `send`)
    only ends the stream, and the session stays on the server to resume (until its idle TTL);
    `detach()` ends the stream on purpose, for the same."""

    def __init__(
        self,
        client: Client,
        model: str,
        version: int,
        session_id: str,
        output: OutputMode,
        top_k: int,
        timeout: float | None,
    ) -> None:
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._requests.put(
            pb.StreamRequest(
                open=pb.StreamOpen(
                    model_name=model,
                    model_version=version,
                    session_id=session_id,
                    output_mode=output_mode(output),
                    top_k=top_k,
                )
            )
        )
        # gRPC's request-consumer thread blocks in `get` until the None sentinel comes, even after
        # the call has ended: every way out of the session puts it (`_end_requests`), and so does
        # a session dropped without one (the finalizer) or open when its client closes.
        self._end_requests = weakref.finalize(self, self._requests.put, None)
        self._client = client
        self._open = False
        self._sending = threading.Lock()  # held while a chunk waits for its answer
        client._sessions.add(self)
        wait = client.timeout
        expired = threading.Event()
        alarm = None
        try:
            self._call = call = client.stub.Stream(
                iter(self._requests.get, None), timeout=timeout, metadata=client._metadata
            )
            # A session dropped, or still open at interpreter exit, ends its call now, not after
            # the server answers the half-close: see `_finish`.
            weakref.finalize(self, self._call.cancel)
            self._responses: Iterator[pb.StreamResponse] = iter(self._call)

            def expire() -> None:
                expired.set()
                call.cancel()

            alarm = None if wait is None else WATCHDOG.after(wait, expire)
            opened = _next(self._responses, session_id).opened
            self.info = session_info(opened)
        except BaseException as exc:
            self._abort()
            if wait is not None and expired.is_set():
                raise open_timeout(wait) from exc
            raise
        finally:
            if alarm is not None:
                alarm.cancel()
        self.id = opened.session_id
        self.steps = opened.steps
        self._open = True

    def send(self, data: ArrayLike, *, timeout: float | None = None) -> StepResult:
        """Stream one chunk ([T, D] or [T], any T >= 1); returns its outputs, waiting at most
        `timeout` seconds (default: the client's timeout) for them. An error after the chunk
        went out ends the stream (the server has ended it, or it is out of step); so does the
        timeout (`TimeoutError`), and the resumed session tells how far it got."""
        check_open(self._open, self.id)
        if not self._sending.acquire(blocking=False):
            raise one_at_a_time(self.id)
        try:
            return self._send(data, timeout)
        finally:
            self._sending.release()

    def _send(self, data: ArrayLike, timeout: float | None) -> StepResult:
        timeout = self._client.timeout if timeout is None else timeout
        expired = threading.Event()
        call = self._call  # (not `self`: the timer must not keep the session alive)

        def expire() -> None:  # the blocking response iterator has no timeout of its own
            expired.set()
            call.cancel()

        self._requests.put(pb.StreamRequest(chunk=chunk(data, self.steps)))
        alarm = None if timeout is None else WATCHDOG.after(timeout, expire)
        try:
            result = step_result(_next(self._responses, self.id).step)
        except BaseException as exc:
            self._abort()
            if timeout is not None and expired.is_set():
                raise chunk_timeout(self.id, timeout) from exc
            raise
        finally:
            if alarm is not None:
                alarm.cancel()
        self.steps = result.total_steps
        return result

    def _abort(self) -> None:
        """Cancel the stream (the session stays on the server) and free the consumer thread."""
        self._open = False
        try:
            if hasattr(self, "_call"):  # not when starting the call itself failed
                self._call.cancel()
        finally:
            self._end_requests()

    def close(self, *, timeout: float | None = None) -> None:
        """End the session on the server and the stream, waiting at most `timeout` seconds
        (default: the client's timeout) for the server to confirm (else `TimeoutError`)."""
        if self._open:
            self._open = False
            self._requests.put(pb.StreamRequest(close=True))
            self._end_requests()
            timeout = self._client.timeout if timeout is None else timeout
            try:
                answers = self._finish(timeout)
            except TimeoutError as exc:
                raise close_timeout(self.id, timeout or 0.0) from exc
            if not answers:
                raise RuntimeError(f"the stream of session {self.id} ended before it was closed")

    def detach(self, *, timeout: float | None = None) -> str:
        """End the stream but keep the session on the server; returns its id for resuming.
        After `timeout` seconds (default: the client's timeout) without the server's end of
        the stream, the call is cancelled, which keeps the session as well."""
        if self._open:
            self._open = False
            self._end_requests()
            timeout = self._client.timeout if timeout is None else timeout
            with contextlib.suppress(TimeoutError):  # cancelled by then; the session stays
                self._finish(timeout)
        return self.id

    def _finish(self, timeout: float | None) -> list[pb.StreamResponse]:
        """Read the stream to its end, so that the call has finished when the session is done
        with it (a call still in progress when the interpreter exits can deadlock gRPC's
        collection of it); cancel it if the reading fails or takes over `timeout` seconds
        (then `TimeoutError`)."""
        expired = threading.Event()
        call = self._call

        def expire() -> None:
            expired.set()
            call.cancel()

        alarm = None if timeout is None else WATCHDOG.after(timeout, expire)
        try:
            return list(self._responses)
        except BaseException as exc:
            call.cancel()  # a no-op on a call that has already ended
            if expired.is_set():
                raise TimeoutError from exc
            raise
        finally:
            if alarm is not None:
                alarm.cancel()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def _next(responses: Iterator[pb.StreamResponse], session_id: str) -> pb.StreamResponse:
    """The stream's next answer; a stream the server ended without an error has none."""
    answer = next(responses, None)
    if answer is None:
        raise stream_ended(session_id)
    return answer
