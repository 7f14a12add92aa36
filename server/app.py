"""Assemble and run the server: repository, batchers, sessions, gRPC services, metrics, health."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rnnserve.server.interceptors import MalformedRequestInterceptor
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.security import TokenInterceptor, server_credentials, token_interceptor
from rnnserve.server.served_model import LoadState
from rnnserve.server.servicer import SERVICE, InferenceServicer
from rnnserve.server.session_service import SessionService
from rnnserve.server.sessions import MemorySessionStore, Session
from rnnserve.server.settings import CannotStart, Settings
from rnnserve.server.warmup import warm_front_door
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def check_port_free(host: str, port: int) -> None:
    """OSError if `host:port` is taken (port 0, any free port, always binds)."""
    if port == 0:
        return
    host = host.strip("[]")  # an IPv6 address as gRPC writes it
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    errors = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(f"cannot bind {host}:{port}: address already in use") from None
                errors.append(exc)
    if len(errors) == len(addresses):  # gRPC starts if any of them binds (IPv6 may be off)
        raise OSError(f"cannot bind {host}:{port}: {errors[0].strerror}")


def check_snapshot_writable(path: Path) -> None:
    """CannotStart if sessions could not be saved to `path` at shutdown (they would be lost
    at every stop, found only then)."""
    folder = path.parent
    if not folder.is_dir():
        raise CannotStart(f"session snapshot {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CannotStart(f"session snapshot {path}: folder {folder} is not writable")


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = HealthServicer()
        self.repository = Repository(
            settings, observer_for=self.metrics.batch_observer, listener=self._model_event
        )
        self.store = MemorySessionStore(
            ttl=settings.session_ttl,
            max_sessions=settings.max_sessions,
            overflow=settings.session_overflow,
            on_end=self._session_ended,
        )
        self.sessions = SessionService(
            self.repository, self.store, saved=bool(settings.session_snapshot)
        )
        self.servicer = InferenceServicer(self.repository, self.sessions, self.metrics, settings)
        self.metrics.live(self._batchers, lambda: len(self.store))
        self.port = 0
        self.metrics_port = -1
        self._restored = False  # a stop before the snapshot was read must not overwrite it
        self._grpc: grpc.aio.Server | None = None
        self._hurry: asyncio.Event | None = None  # set by hurry(): the grace period ends now
        self._tasks: list[asyncio.Task[None]] = []
        self._health_tasks: set[asyncio.Task[None]] = set()

    # ---- wiring ----

    def _batchers(self) -> list[tuple[str, int, int, int, int]]:
        return [
            (
                m.name,
                m.version,
                m.batcher.queue_depth,
                m.batcher.stats.dropped,
                m.batcher.stats.restarts,
            )
            for m in self.repository.served()
        ]

    def _session_ended(self, session: Session, reason: str) -> None:
        self.metrics.session_ends.labels(reason).inc()
        self.sessions.unpin(session)
        self.servicer.session_ended(session.id)

    def _model_event(self, name: str, version: int, event: str, seconds: float | None) -> None:
        self.metrics.model_event(name, version, event, seconds)
        try:
            self.repository.resolve(name)
            status = _SERVING
        except Exception:
            status = _NOT_SERVING
        for service, value in ((name, status), *self._server_health()):
            task = asyncio.get_running_loop().create_task(self.health.set(service, value))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    def _server_health(self) -> list[tuple[str, int]]:
        """The server's own statuses: SERVING while some model version is ready to answer (a
        server with no model, or none loaded, answers nothing useful: NOT_SERVING)."""
        ready = any(m.state is LoadState.READY for m in self.repository.served())
        return [(service, _SERVING if ready else _NOT_SERVING) for service in ("", SERVICE)]

    # ---- life cycle ----

    def _bind(
        self, credentials: grpc.ServerCredentials | None, tokens: TokenInterceptor | None
    ) -> grpc.aio.Server:
        """The gRPC server with its services, bound to its port (not yet started)."""
        s = self.settings
        limit = s.max_message_mb * 1024 * 1024
        interceptors: list[grpc.aio.ServerInterceptor] = [
            MalformedRequestInterceptor(self.servicer.refused)
        ]
        if tokens is not None:
            interceptors.insert(0, tokens)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                # The queue in front of the handlers: when the event loop cannot keep up, calls
                # wait here, and every call behind them waits too. Bounded, it keeps refusals
                # (RESOURCE_EXHAUSTED from the handlers) fast; gRPC cancels what is beyond it.
                ("grpc.server.max_pending_requests", s.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 4 * s.max_pending_rpcs),
            ],
        )
        pb_grpc.add_InferenceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        address = f"{s.host}:{s.port}"
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc.aio's way of saying the address is taken
            raise OSError(f"cannot bind {address}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot bind {address}")
        return server

    async def start(self) -> int:
        s = self.settings
        # A mistyped --model-dir would otherwise start a server that serves nothing, forever.
        if not await asyncio.to_thread(Path(s.model_dir).is_dir):
            raise OSError(f"model repository {s.model_dir} is not a directory (--model-dir)")
        # What can fail the start is checked before the models load (tens of seconds): the TLS
        # and token files, the metrics port, then the gRPC port (so that it cannot be the one
        # metrics took). gRPC itself binds only once they are loaded: its port accepts
        # connections as soon as it is bound, and a client connecting then would wait for its
        # deadline instead of being refused at once.
        credentials = server_credentials(s)
        tokens = token_interceptor(s, self.servicer.refused) if s.token_file or s.tokens else None
        if s.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(s.metrics_bind, s.metrics_port)
            except OSError as exc:
                where = f"{s.metrics_bind}:{s.metrics_port}"
                raise OSError(f"cannot serve metrics on {where}: {exc}") from None
        await asyncio.to_thread(check_port_free, s.host, s.port)
        if s.session_snapshot:
            await asyncio.to_thread(check_snapshot_writable, Path(s.session_snapshot))
        log.info("loading models from %s; the gRPC port opens once they are ready", s.model_dir)
        await self.repository.sync()
        if s.session_snapshot:
            restored = self.sessions.restore(Path(s.session_snapshot))
            self._restored = True
            log.info("restored %d sessions from %s", restored, s.session_snapshot)
        if s.warmup:
            # Its own servicer and metrics: warm-up calls are not traffic.
            servicer = InferenceServicer(self.repository, self.sessions, Metrics(), s)
            await warm_front_door(servicer, self.repository.served())
        server = self._bind(credentials, tokens)
        await server.start()
        self._grpc = server
        for service, status in self._server_health():
            await self.health.set(service, status)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._expire_sessions()))
        self._tasks.append(loop.create_task(self._watch_loop_lag()))
        if s.poll_interval > 0:
            self._tasks.append(loop.create_task(self.repository.watch(s.poll_interval)))
        if s.session_snapshot:  # last: a start that fails before here keeps the file
            self.sessions.retire_snapshot(Path(s.session_snapshot))
        log.info(
            "serving %s on %s:%d (metrics %s)",
            ", ".join(sorted({m.name for m in self.repository.served()})) or "no models",
            s.host,
            self.port,
            f"{s.metrics_bind}:{self.metrics_port}" if self.metrics_port >= 0 else "off",
        )
        return self.port

    async def _expire_sessions(self) -> None:
        interval = max(0.05, min(self.settings.session_ttl / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            self.store.expire()

    async def _watch_loop_lag(self, interval: float = 0.25) -> None:
        """How late a timer fires is how long the loop was busy with other work; every call
        waits about that long for the loop before its handler runs."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.metrics.loop_lag.observe((), max(loop.time() - due, 0.0))

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new work (UNAVAILABLE), finish in-flight work, save sessions, stop."""
        grace = self.settings.grace if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._hurry is None:
            self._hurry = asyncio.Event()
        self.servicer.drain()
        await self.health.enter_graceful_shutdown()
        # New chunks are refused now; once those in flight are done the states are final. Save
        # them before waiting for the other calls, so that a kill after the grace period (or a
        # slow unary call) cannot lose them.
        await self._unless_hurried(self.sessions.quiesce(grace))
        if self.sessions.in_flight:
            log.warning(
                "%d chunks still in flight; saving sessions as they are", self.sessions.in_flight
            )
        self.sessions.freeze()  # from here no chunk is applied, so the snapshot stays true
        if self.settings.session_snapshot and self._restored:
            path = Path(self.settings.session_snapshot)
            try:
                saved = self.sessions.save(path)
                log.info("saved %d sessions to %s", saved, path)
            except Exception as exc:  # the rest of the shutdown must still happen
                log.error("could not save sessions to %s: %s; they are lost", path, exc)
        if self._grpc is not None:
            stopping = asyncio.ensure_future(self._grpc.stop(max(deadline - loop.time(), 0.0)))
            if not await self._unless_hurried(asyncio.shield(stopping)):
                await self._grpc.stop(0)  # cancels the calls still running
            await stopping
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task %s had failed", task.get_name())
        await self.repository.close()
        await asyncio.to_thread(self.metrics.close)  # waits for its thread to end

    def hurry(self) -> None:
        """End the grace period now (a second stop signal): what still runs is cancelled, and
        sessions are saved as they are."""
        if self._hurry is None:
            self._hurry = asyncio.Event()
        self._hurry.set()

    async def _unless_hurried(self, work: Awaitable[object]) -> bool:
        """Await `work`; False if `hurry()` came first (`work` is then cancelled)."""
        assert self._hurry is not None
        task = asyncio.ensure_future(work)
        hurried = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()
