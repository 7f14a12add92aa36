"""asyncio client, the same calls as `Client`, awaited.

```python
async with AsyncClient("127.0.0.1:8500") as client:
    predictions = await client.predict("japanese_vowels", sequences)
    async with client.session("vowels_stream") as s:
        result = await s.send(chunk)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

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
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc


class AsyncClient:
    """The asyncio twin of `Client`: the same calls, awaited, with the same timeouts, retries
    and errors (`grpc.aio.AioRpcError`, a `grpc.RpcError`). A session is opened by
    `async with client.session(...)` or `await s.open()`."""

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
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + tls.options()
            self.channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._metadata = metadata(token)
        self.timeout = timeout
        self.retry = retry
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        await self.channel.close()

    async def _call(
        self, method: Callable[..., Any], request: Any, timeout: float | None, retry: RetryPolicy
    ) -> Any:
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = retry.delays()
        while True:
            try:
                return await method(request, timeout=remaining(deadline), metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                delay = next(delays, None)
                delay = None if delay is None else retry_delay(err, delay)
                left = remaining(deadline)
                if not retry.allows(err) or delay is None or (left is not None and left <= delay):
                    raise
                if self._closed:  # cancelled by our own close(), not shed by the server
                    raise
                await asyncio.sleep(delay)

    async def predict(
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
        request = predict_request(
            model, sequences, version=version, output=output, top_k=top_k, outputs=outputs
        )
        response = await self._call(self.stub.Predict, request, timeout, self.retry)
        return [prediction(r) for r in response.results]

    async def predict_one(self, model: str, sequence: ArrayLike, **kwargs: Any) -> Prediction:
        return (await self.predict(model, [sequence], **kwargs))[0]

    async def metadata(
        self, model: str, version: int = 0, *, timeout: float | None = None
    ) -> ModelInfo:
        request = pb.GetModelMetadataRequest(model_name=model, model_version=version)
        return model_info(
            await self._call(self.stub.GetModelMetadata, request, timeout, self.retry)
        )

    async def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return await self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout, self.retry)

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> bool:
        """See `Client.health`: raises when there is no answer or no such model."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(self._health.Check, request, timeout, NO_RETRY)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def session(
        self,
        model: str = "",
        *,
        version: int = 0,
        session_id: str = "",
        output: OutputMode = "both",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> AsyncSession:
        """See `Client.session` (`timeout`: a deadline for the whole stream); opened by
        `async with` or `await s.open()`."""
        return AsyncSession(self, model, version, session_id, output, top_k, timeout)

    async def open_session(
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
        return session_info(await self._call(self.stub.OpenSession, request, timeout, retry))

    async def step(
        self,
        session_id: str,
        data: ArrayLike,
        *,
        offset: int | None = None,
        output: OutputMode = "both",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> StepResult:
        request = pb.StepSessionRequest(
            session_id=session_id,
            chunk=chunk(data, offset),
            output_mode=output_mode(output),
            top_k=top_k,
        )
        retry = self.retry if offset is not None else NO_RETRY
        return step_result(await self._call(self.stub.StepSession, request, timeout, retry))

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        request = pb.CloseSessionRequest(session_id=session_id)
        return session_info(await self._call(self.stub.CloseSession, request, timeout, NO_RETRY))

    async def export_session(
        self, session_id: str, *, remove: bool = False, timeout: float | None = None
    ) -> pb.SessionState:
        request = pb.ExportSessionRequest(session_id=session_id, remove=remove)
        return await self._call(self.stub.ExportSession, request, timeout, NO_RETRY)

    async def import_session(
        self, state: pb.SessionState, *, timeout: float | None = None
    ) -> SessionInfo:
        return session_info(await self._call(self.stub.ImportSession, state, timeout, NO_RETRY))


class AsyncSession:
    """`async with client.session(model) as s: await s.send(chunk)`; see `Session`."""

    def __init__(
        self,
        client: AsyncClient,
        model: str,
        version: int,
        session_id: str,
        output: OutputMode,
        top_k: int,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._open_message = pb.StreamRequest(
            open=pb.StreamOpen(
                model_name=model,
                model_version=version,
                session_id=session_id,
                output_mode=output_mode(output),
                top_k=top_k,
            )
        )
        self._timeout = timeout
        self._call: Any = None
        self._open = False
        self._sending = False  # a chunk waits for its answer
        self.id = ""
        self.steps = 0
        self.info: SessionInfo | None = None

    async def open(self) -> AsyncSession:
        """Open the stream and the session (or resume it), waiting at most the client's timeout
        for the server's answer (else `TimeoutError`). A session opens once."""
        if self._call is not None:
            raise RuntimeError(
                "this session has been opened already; client.session(...) makes a new one"
            )
        self._call = self._client.stub.Stream(
            timeout=self._timeout, metadata=self._client._metadata
        )
        wait = self._client.timeout
        try:
            async with asyncio.timeout(wait):
                await self._write(self._open_message)
                opened = (await self._answer()).opened
        except TimeoutError as exc:
            self._abort()
            raise open_timeout(wait or 0.0) from exc
        except BaseException:
            self._abort()
            raise
        self.info = session_info(opened)
        self.id, self.steps = opened.session_id, opened.steps
        self._open = True
        return self

    async def send(self, data: ArrayLike, *, timeout: float | None = None) -> StepResult:
        """Stream one chunk ([T, D] or [T], any T >= 1); returns its outputs, waiting at most
        `timeout` seconds (default: the client's timeout). An error after the chunk went out,
        or the timeout (`TimeoutError`), ends the stream; the session stays to resume."""
        check_open(self._open, self.id)
        if self._sending:
            raise one_at_a_time(self.id)
        self._sending = True
        try:
            return await self._send(data, timeout)
        finally:
            self._sending = False

    async def _send(self, data: ArrayLike, timeout: float | None) -> StepResult:
        timeout = self._client.timeout if timeout is None else timeout
        message = pb.StreamRequest(chunk=chunk(data, self.steps))
        try:
            async with asyncio.timeout(timeout):
                await self._write(message)
                result = step_result((await self._answer()).step)
        except TimeoutError as exc:
            self._abort()
            raise chunk_timeout(self.id, timeout) from exc
        except BaseException:
            self._abort()
            raise
        self.steps = result.total_steps
        return result

    async def _write(self, message: pb.StreamRequest) -> None:
        """Write to the stream; if the server has ended it, raise why (gRPC itself says only
        that the call has finished)."""
        try:
            await self._call.write(message)
        except asyncio.InvalidStateError:
            raise await self._ended() from None

    async def _answer(self) -> pb.StreamResponse:
        answer = await self._call.read()
        if answer is grpc.aio.EOF:
            raise await self._ended()
        return answer

    async def _ended(self) -> Exception:
        """The status the server ended the stream with, as the error it is."""
        call = self._call
        code = await call.code()
        if code is grpc.StatusCode.OK:
            return stream_ended(self.id)
        return grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
        )

    def _abort(self) -> None:
        """Cancel the stream; the session stays on the server."""
        self._open = False
        if self._call is not None:
            self._call.cancel()

    async def close(self, *, timeout: float | None = None) -> None:
        """End the session on the server and the stream (nothing once the stream has ended),
        waiting at most `timeout` seconds (default: the client's timeout) for the server to
        confirm (else `TimeoutError`)."""
        if self._open:
            self._open = False
            timeout = self._client.timeout if timeout is None else timeout
            try:
                answers = await self._finish(timeout, pb.StreamRequest(close=True))
            except TimeoutError as exc:
                raise close_timeout(self.id, timeout or 0.0) from exc
            if not answers:
                raise RuntimeError(f"the stream of session {self.id} ended before it was closed")

    async def detach(self, *, timeout: float | None = None) -> str:
        """End the stream but keep the session on the server; returns its id for resuming.
        After `timeout` seconds (default: the client's timeout) without the server's end of
        the stream, the call is cancelled, which keeps the session as well."""
        if self._open:
            self._open = False
            timeout = self._client.timeout if timeout is None else timeout
            with contextlib.suppress(TimeoutError):  # cancelled by then; the session stays
                await self._finish(timeout)
        return self.id

    async def _finish(self, timeout: float | None, *requests: pb.StreamRequest) -> int:
        """Send `requests`, half-close, and read the stream to its end, so that the call has
        finished when the session is done with it (see `Session._finish`); cancel it if any of
        that fails or takes over `timeout` seconds. Returns how many answers came."""
        answers = 0
        try:
            async with asyncio.timeout(timeout):
                for request in requests:
                    await self._write(request)
                await self._call.done_writing()
                while await self._call.read() is not grpc.aio.EOF:
                    answers += 1
        except BaseException:
            self._call.cancel()
            raise
        return answers

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            self._abort()
