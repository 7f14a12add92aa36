"""The gRPC front door of rnnserve.v1: decode, hand to the data plane, encode.

Every handler runs inside `_Call`, which turns errors into a status through `errors.status_of` (the
one table) and counts the outcome in metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from rnnserve.server.errors import InvalidInput, NotFound, ServeError, Unavailable, status_of
from rnnserve.server.inputs import check_request_size, decode_request
from rnnserve.server.logs import Throttle
from rnnserve.server.metrics import UNKNOWN_MODEL, Metrics
from rnnserve.server.outputs import encode_row, select
from rnnserve.server.repository import Repository
from rnnserve.server.served_model import LoadState, ServedModel
from rnnserve.server.session_service import SessionService
from rnnserve.server.sessions import Session, check_session_id
from rnnserve.server.settings import Settings
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_STATE = {
    LoadState.LOADING: pb.MODEL_STATE_LOADING,
    LoadState.READY: pb.MODEL_STATE_READY,
    LoadState.DRAINING: pb.MODEL_STATE_DRAINING,
    LoadState.FAILED: pb.MODEL_STATE_FAILED,
}
_DTYPE = {"float32": pb.DATA_TYPE_FLOAT32, "int32": pb.DATA_TYPE_INT32}
# Outcomes logged at debug level only: the normal ones.
_QUIET = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}
# The server's fault, not the request's: shown at --log-level warning too.
_OURS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
# The others: at most one line a second per (method, model, status).
_THROTTLE = Throttle()


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


REQUEST_ID = "x-request-id"
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


def _retry_hint(exc: BaseException) -> tuple[tuple[str, str], ...]:
    after = getattr(exc, "retry_after", None)
    return (("retry-after-ms", str(round(after * 1000))),) if after else ()


# Request ids unique to this process, cheap to make: a random prefix and a counter.
_ID_PREFIX = os.urandom(4).hex() + "-"
_ID_COUNTER = itertools.count(1)


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` (bounded), or a new one; echoed back in trailing metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and isinstance(value, str) and value:
            return value[:128]
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


class _Call:
    """Times one RPC (or stream chunk), maps its errors to a status, records and logs the outcome
    (method, model, status, duration, request id; never the payload)."""

    def __init__(self, metrics: Metrics, method: str, request_id: str) -> None:
        self.metrics = metrics
        self.method = method
        self.request_id = request_id
        self.model = UNKNOWN_MODEL
        self.version = 0
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.started = time.perf_counter()
        self._recorded = False

    def serving(self, model: ServedModel) -> ServedModel:
        self.model, self.version = model.name, model.version
        return model

    def session(self, sessions: SessionService, session_id: str) -> str:
        """Label the call with the model of the session it names (when that session exists)."""
        session = sessions.store.peek(session_id)
        if session is not None:
            self.model, self.version = session.model, session.version
        return session_id

    def failed(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        self.code, self.message = status_of(exc)
        if not isinstance(exc, ServeError):
            log.exception(
                "unexpected error in %s",
                self.method,
                exc_info=exc,
                extra={"request_id": self.request_id},
            )
        return self.code, self.message

    def done(self, *, log_it: bool = True) -> None:
        """Record and log the outcome, once (the error path records before it sends the status)."""
        if self._recorded:
            return
        self._recorded = True
        ended = time.perf_counter()
        seconds = ended - self.started
        self.metrics.request(self.model, self.version, self.method, self.code, seconds)
        level = (
            logging.DEBUG
            if self.code in _QUIET
            else logging.WARNING
            if self.code in _OURS
            else logging.INFO
        )
        if not log_it or not log.isEnabledFor(level):
            return
        held = 0
        if not log.isEnabledFor(logging.DEBUG):  # at debug level every call is logged
            allowed, held = _THROTTLE.allow((self.method, self.model, self.code), ended)
            if not allowed:
                return
        log.log(
            level,
            "%s %s -> %s in %.1f ms%s [request %s]%s",
            self.method,
            self.model,
            self.code.name,
            seconds * 1000,
            f": {self.message}" if self.message else "",
            self.request_id,
            f" (and {held} more like it since the last line)" if held else "",
            extra={
                "request_id": self.request_id,
                "method": self.method,
                "model": self.model,
                "version": self.version,
                "code": self.code.name,
                "duration_ms": round(seconds * 1000, 3),
                "held_back": held,
            },
        )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        repository: Repository,
        sessions: SessionService,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self.repository = repository
        self.sessions = sessions
        self.metrics = metrics
        self.settings = settings
        self.draining = False
        # Streams waiting for their next message, with their session's id ("" before `open`);
        # of those, the ones ended from outside (drain, their session ended), with the error.
        self._waiting: dict[asyncio.Task[Any], str] = {}
        self._ended: dict[asyncio.Task[Any], ServeError] = {}
        self._waiting_for: dict[str, set[asyncio.Task[Any]]] = {}  # session id -> its streams

    def drain(self) -> None:
        """Refuse new work from now on, and end the streams that wait for their next message
        (UNAVAILABLE; their sessions stay and can be resumed): a stream held open between chunks
        would otherwise hold up shutdown for the whole grace period."""
        self.draining = True
        for task, session_id in list(self._waiting.items()):
            self._end_stream(task, self._shutting_down(session_id))

    def _shutting_down(self, session_id: str) -> Unavailable:
        """The refusal of a stream's next message while draining ("" before its `open`)."""
        then = f"; {self.sessions.after_shutdown(session_id)}" if session_id else ""
        return Unavailable(f"server is shutting down{then}")

    def session_ended(self, session_id: str) -> None:
        """End the stream that waits for the next chunk of a session that has just ended (expired,
        evicted, closed by another call, its version unloaded): NOT_FOUND saying why. Without
        this, a client that went quiet without ending its stream would hold the call open."""
        for task in list(self._waiting_for.get(session_id, ())):
            self._end_stream(task, NotFound(self.sessions.store.why_missing(session_id)))

    def _end_stream(self, task: asyncio.Task[Any], error: ServeError) -> None:
        if task not in self._ended:
            self._ended[task] = error
            task.cancel()

    async def _next(self, requests: AsyncIterator[Any], session_id: str) -> Any:
        """The stream's next message (None at its end), unless the server drains or the session
        ends first."""
        if self.draining:
            raise self._shutting_down(session_id)
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = session_id
        if session_id:
            self._waiting_for.setdefault(session_id, set()).add(task)
        try:
            return await anext(requests, None)
        except asyncio.CancelledError:
            error = self._ended.get(task)
            if error is None:
                raise
            task.uncancel()
            raise error from None
        finally:
            self._waiting.pop(task, None)
            self._ended.pop(task, None)
            streams = self._waiting_for.get(session_id)
            if streams is not None:
                streams.discard(task)
                if not streams:
                    del self._waiting_for[session_id]

    def _resumed(self, session_id: str) -> Session:
        """The session a stream resumes. A stream never creates a session of a given id (a
        mistyped id would start a fresh state in silence): the refusal says what does."""
        try:
            return self.sessions.store.get(check_session_id(session_id))
        except NotFound as exc:
            if self.sessions.store.ended_as(session_id) is None:  # an id never seen
                raise NotFound(
                    f"{exc}; a stream's `open` with an id resumes an existing session: create "
                    "one of your own id with OpenSession first, or open without an id"
                ) from None
            raise

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, body: Any) -> Any:
        call = _Call(self.metrics, method, request_id_of(context))
        trailer = ((REQUEST_ID, call.request_id),)
        try:
            if self.draining:
                raise Unavailable("server is shutting down; retry on another replica")
            response = await body(call)
            context.set_trailing_metadata(trailer)
            return response
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = call.failed(exc)
            call.done()  # before abort, which sends the status: the client must not outrun the log
            await context.abort(code, message, trailing_metadata=trailer + _retry_hint(exc))
        finally:
            call.done()

    def refused(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
    ) -> tuple[tuple[str, str], ...]:
        """A call refused by an interceptor before its handler (a unary request that did not
        parse, a missing token): counted and logged like any failed call, and its request id
        sent back."""
        if not method.startswith(f"/{SERVICE}/"):
            return ()  # health and reflection: not rnnserve's calls
        call = _Call(self.metrics, method.rpartition("/")[2], request_id_of(context))
        call.code, call.message = code, message
        call.done()
        return ((REQUEST_ID, call.request_id),)

    # ---- prediction ----

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        async def body(call: _Call) -> pb.PredictResponse:
            model = call.serving(self.repository.resolve(request.model_name, request.model_version))
            selection = select(model, request.output_mode, request.output_names, request.top_k)
            check_request_size(
                model.inputs,
                request.sequences,
                max_sequences=self.settings.max_sequences,
                max_timesteps=self.settings.max_request_timesteps,
            )
            model.batcher.check_room(len(request.sequences))
            sequences = decode_request(model.inputs, request.sequences)
            futures = model.batcher.submit_many(sequences, deadline=deadline_of(context))
            if len(futures) == 1:  # a cancelled handler cancels the future it awaits
                rows = [await futures[0]]
            else:
                try:
                    rows = await asyncio.gather(*futures)
                finally:
                    for future in futures:
                        future.cancel()  # no-op once done; drops the rest if one failed
            response = pb.PredictResponse(model_name=model.name, model_version=model.version)
            results = response.results
            for row, x in zip(rows, sequences, strict=True):
                encode_row(row, len(x), selection, results.add())
            return response

        return await self._unary("Predict", context, body)

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadata:
        async def body(call: _Call) -> pb.ModelMetadata:
            model = call.serving(self.repository.resolve(request.model_name, request.model_version))
            return self.metadata(model)

        return await self._unary("GetModelMetadata", context, body)

    def metadata(self, model: ServedModel) -> pb.ModelMetadata:
        plan = model.plan
        return pb.ModelMetadata(
            name=model.name,
            version=model.version,
            available_versions=self.repository.versions_of(model.name),
            description=model.config.description,
            input_dtype=_DTYPE[plan.input_dtype],
            step_shape=plan.step_shape,
            max_length=model.max_length,
            outputs=[
                pb.OutputMetadata(
                    name=o.name,
                    kind=pb.OUTPUT_KIND_STEP if o.per_step else pb.OUTPUT_KIND_SEQUENCE,
                    shape=o.shape,
                    labels=o.labels,
                )
                for o in plan.outputs
            ],
            can_stream=plan.can_stream,
            mixed_length_batching=plan.mixed_lengths,
            notes=plan.notes,
            states=[pb.StateMetadata(layer=s.layer, sizes=s.sizes) for s in plan.states],
            state=_STATE[model.state],
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def body(call: _Call) -> pb.ListModelsResponse:
            response = pb.ListModelsResponse()
            summaries: dict[str, pb.ModelSummary] = {}
            for status in self.repository.statuses():
                summary = summaries.get(status.name)
                if summary is None:
                    summary = summaries[status.name] = response.models.add(name=status.name)
                if status.version or status.error:  # version 0: a model-level config error
                    summary.versions.add(
                        version=status.version, state=_STATE[status.state], error=status.error
                    )
            return response

        return await self._unary("ListModels", context, body)

    # ---- sessions ----

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        async def body(call: _Call) -> pb.SessionInfo:
            session = self.sessions.open(
                request.model_name, request.model_version, request.session_id
            )
            call.model, call.version = session.model, session.version
            return self.sessions.info(session)

        return await self._unary("OpenSession", context, body)

    async def StepSession(
        self, request: pb.StepSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse:
        async def body(call: _Call) -> pb.StepResponse:
            return await self.sessions.step(
                call.session(self.sessions, request.session_id),
                request.chunk,
                mode=request.output_mode,
                top_k=request.top_k,
                deadline=deadline_of(context),
            )

        return await self._unary("StepSession", context, body)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        async def body(call: _Call) -> pb.SessionInfo:
            return self.sessions.close(call.session(self.sessions, request.session_id))

        return await self._unary("CloseSession", context, body)

    async def ExportSession(
        self, request: pb.ExportSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionState:
        async def body(call: _Call) -> pb.SessionState:
            return self.sessions.export(
                call.session(self.sessions, request.session_id), request.remove
            )

        return await self._unary("ExportSession", context, body)

    async def ImportSession(
        self, request: pb.SessionState, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        async def body(call: _Call) -> pb.SessionInfo:
            session = self.sessions.import_(request)
            call.model, call.version = session.model, session.version
            return self.sessions.info(session)

        return await self._unary("ImportSession", context, body)

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """One stream is one session. An error ends the stream but never the session: nothing of
        the failed chunk is applied, and the client can resume by id."""
        call = _Call(self.metrics, "Stream", request_id_of(context))
        context.set_trailing_metadata(((REQUEST_ID, call.request_id),))  # as unary calls do
        try:
            requests = aiter(requests)
            first = await self._next(requests, "")
            if first is None or first.WhichOneof("kind") != "open":
                raise InvalidInput("the first message of a stream must be `open`")
            opening = first.open
            if opening.session_id:
                session = self._resumed(opening.session_id)
                if opening.model_name and opening.model_name != session.model:
                    raise InvalidInput(
                        f"session {session.id} belongs to model {session.model}, "
                        f"not {opening.model_name}"
                    )
                if opening.model_version and opening.model_version != session.version:
                    raise InvalidInput(
                        f"session {session.id} is pinned to version {session.version} of "
                        f"{session.model}, not {opening.model_version}"
                    )
            else:
                session = self.sessions.open(opening.model_name, opening.model_version)
            call.model, call.version = session.model, session.version
            try:
                selection = self.sessions.selection(session, opening.output_mode, opening.top_k)
            except ServeError:
                if not opening.session_id:  # opened for this stream, whose id nobody has seen
                    self.sessions.close(session.id)
                raise
            yield pb.StreamResponse(opened=self.sessions.info(session))
            while (message := await self._next(requests, session.id)) is not None:
                kind = message.WhichOneof("kind")
                if kind == "close":
                    yield pb.StreamResponse(closed=self.sessions.close(session.id))
                    return
                if kind != "chunk":
                    got = kind or "an empty message"
                    raise InvalidInput(f"expected a chunk or close message, got {got}")
                chunk = _Call(self.metrics, "StreamChunk", call.request_id)
                chunk.model, chunk.version = session.model, session.version
                try:
                    if self.draining:
                        raise self._shutting_down(session.id)
                    step = await self.sessions.step(
                        session.id, message.chunk, selection, deadline=deadline_of(context)
                    )
                except asyncio.CancelledError:
                    chunk.code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:
                    chunk.code = status_of(exc)[0]
                    raise
                finally:
                    chunk.done(log_it=False)  # counted here; a failure is logged by the stream
                yield pb.StreamResponse(step=step)
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = call.failed(exc)
            trailer = ((REQUEST_ID, call.request_id), *_retry_hint(exc))
            call.done()  # before abort, as in _unary
            await context.abort(code, message, trailing_metadata=trailer)
        finally:
            call.done()
