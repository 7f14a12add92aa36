"""A model version's batches computed in a child process (`--compute-process`, opt-in).

In the serving process the batch thread needs the interpreter lock that the event loop needs too:
before and after every model call, it waits for the loop to let go, so a batch that takes 2 ms
alone takes 7-14 ms while requests keep arriving, and the batcher does best by letting the clients
fall into step (one big batch, the loop idle while it computes). Computed in a child, a batch
holds no lock of the server's: the loop takes in the next requests meanwhile, and with batches of
half the clients the two overlap. Costs: a second copy of the model in memory, and its load and
compiles at start.

The child loads the same file and builds the same plan (only models the padded engine serves as
planned come here: the self-check passed in the parent). It computes one batch at a time on one
TensorFlow thread, leaving the other cores to the serving process (with `workers` > 1, the other
workers' batches run in process meanwhile). Batches go over a pipe, whose answer wakes the event
loop directly. If the child dies, the batch in flight fails like a dead
batch worker (its sequences are requeued) and every later batch runs in the serving process.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)
READY_TIMEOUT = 900.0  # seconds for the child to load and compile


@dataclass(frozen=True)
class ChildSpec:
    path: str
    allow_code: bool
    xla: bool
    max_rows: int
    warm_length: int  # compile the typical shapes up to this length first (0: no warm-up)


def _child(conn: Connection, spec: ChildSpec) -> None:
    # Stopping is the parent's: it closes the pipe, and the child ends at its end (a Ctrl-C to the
    # process group must not kill batches the parent is still finishing).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from rnnserve.server.forward import Forward
    from rnnserve.server.plan import build_plan
    from rnnserve.server.runner import ModelRunner
    from rnnserve.server.served_model import compile_typical_shapes

    try:
        model = keras.saving.load_model(spec.path, compile=False, safe_mode=not spec.allow_code)
        plan = build_plan(model, allow_code=spec.allow_code)
        forward = Forward(plan, xla=spec.xla, max_rows=spec.max_rows)
        if spec.warm_length:
            compile_typical_shapes(forward, spec.max_rows, spec.warm_length)
        runner = ModelRunner(forward)
    except Exception as exc:  # the parent reports it and computes in process
        conn.send_bytes(pickle.dumps(f"{type(exc).__name__}: {exc}"[:500]))
        return
    conn.send_bytes(pickle.dumps("ready"))
    while True:
        try:
            sequences, states = pickle.loads(conn.recv_bytes())
        except EOFError:  # the parent is done with it (or gone)
            os._exit(0)  # not waiting for background compiles at interpreter exit
        cells: list[int] = []
        results = runner.run(sequences, states, cells)
        conn.send_bytes(pickle.dumps((results, cells), protocol=pickle.HIGHEST_PROTOCOL))


class ComputeProcess(concurrent.futures.Executor):
    """Takes the batcher's `submit(runner.run, sequences, states[, cells])` and runs it in the
    child; `fallback` runs it in process once the child is gone."""

    def __init__(self, spec: ChildSpec, fallback: concurrent.futures.Executor, name: str) -> None:
        self.name = name
        self._fallback = fallback
        context = multiprocessing.get_context("spawn")  # not fork: TensorFlow has threads
        self._conn, theirs = context.Pipe()
        self._process = context.Process(
            target=_child, args=(theirs, spec), name=f"rnnserve-compute-{name}", daemon=True
        )
        self._process.start()
        theirs.close()
        self._waiting: collections.deque[tuple[concurrent.futures.Future[Any], Any]] = (
            collections.deque()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.alive = False
        if not self._conn.poll(READY_TIMEOUT):
            self._stop_child()
            raise RuntimeError(f"compute process of {name} not ready after {READY_TIMEOUT:g}s")
        said = pickle.loads(self._conn.recv_bytes())
        if said != "ready":
            self._stop_child()
            raise RuntimeError(f"compute process of {name} could not load the model: {said}")
        self.alive = True

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        if not self.alive or self._waiting:
            # One batch at a time: a second one (`--workers` > 1) would block the event loop in
            # `send_bytes` while the child computes the first, so it runs in process.
            return self._fallback.submit(fn, *args, **kwargs)
        sequences, states, *rest = args
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        if self._loop is None:  # called from the event loop (`run_in_executor`)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._answered)
        try:
            self._conn.send_bytes(pickle.dumps((list(sequences), list(states)), protocol=5))
        except OSError as exc:
            self._died(exc)
            return self._fallback.submit(fn, *args, **kwargs)
        self._waiting.append((future, rest[0] if rest else None))
        return future

    def _answered(self) -> None:
        try:
            results, cells = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self._died(exc)
            return
        future, computed = self._waiting.popleft()
        if computed is not None:
            computed.extend(cells)
        future.set_result(results)

    def _died(self, exc: BaseException) -> None:
        if not self.alive:
            return
        self.alive = False
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        log.error(
            "compute process of %s ended (%s, exit code %s); computing in process from now on",
            self.name,
            type(exc).__name__,
            self._process.exitcode,
        )
        while self._waiting:
            future, _ = self._waiting.popleft()
            future.set_exception(RuntimeError(f"compute process of {self.name} ended"))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self.alive:
            self.alive = False
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
        self._stop_child()
        self._fallback.shutdown(wait=wait, cancel_futures=cancel_futures)

    def _stop_child(self) -> None:
        self._conn.close()  # the child ends at the end of its pipe
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)

    @property
    def pid(self) -> int | None:
        return self._process.pid
