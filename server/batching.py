"""Dynamic micro-batching, one batcher per model version.

The batcher dispatches at once when its model is idle; while a batch computes, new work queues, and
the next batch is formed from the queue. Under load (the last batch held several sequences) it first
gathers: waits while sequences keep arriving, a few milliseconds at most, since one batch of many
costs far less than several small ones, in compute and in the interpreter lock the event loop needs
too. A batch is grown around the oldest waiting sequence (so nothing starves) with the sequences
closest to it in length, bounded by rows and by padded timesteps (rows x longest). A sequence joins
only if that costs less than running it on its own later, by the model's measured cost `steps x
(step_cost + row_cost x rows)`: where each timestep's fixed overhead dominates (small models) short
and long sequences share a batch; where rows dominate, a few long sequences do not pad everything.
Work whose client gave up or whose deadline passed is dropped before compute. The queue is bounded:
when full, submitting refuses at once rather than grow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ResourceExhausted,
    Unavailable,
)
from rnnserve.server.runner import BatchStats, ModelRunner, RowResult

log = logging.getLogger(__name__)
MAX_CRASHES = 2  # batch workers that may die on one piece of work before it fails


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64  # rows
    max_batch_timesteps: int = 32768  # padded cells: rows x longest sequence
    max_delay: float = 0.0  # seconds to wait for a fuller batch when the model is idle
    # Under load (the last batch held several sequences): seconds to wait for a fuller batch
    # while sequences keep arriving (no new one for `gather_gap` ends the wait). A lone client
    # never waits; many get bigger batches, which cost far less per sequence.
    gather: float = 0.0
    gather_gap: float = 0.001
    max_queue: int = 2048  # sequences waiting; beyond it, RESOURCE_EXHAUSTED
    equal_lengths_only: bool = False
    workers: int = 1  # batches computed at the same time
    # Cost of a batch: padded steps x (step_cost + row_cost x rows), in any unit; measured per
    # model at warm-up. By default a sequence joins a batch up to 9x longer than itself.
    step_cost: float = 8.0
    row_cost: float = 1.0

    def cost(self, rows: int, steps: int) -> float:
        return steps * (self.step_cost + self.row_cost * rows)


@dataclass(eq=False, slots=True)
class WorkItem:
    x: np.ndarray
    states: Sequence[np.ndarray] | None
    future: asyncio.Future[RowResult]
    deadline: float | None  # loop time
    enqueued: float  # perf_counter
    session: object | None = None
    crashes: int = 0  # batch workers that died while running it


@dataclass
class BatcherStats:
    """Running totals, for metrics and tests."""

    batches: int = 0
    rows: int = 0
    max_rows: int = 0
    real_timesteps: int = 0
    padded_timesteps: int = 0
    computed_timesteps: int = 0
    dropped: int = 0
    restarts: int = 0


BatchObserver = Callable[[BatchStats, Sequence[float]], None]


def batch_threads(policy: BatchPolicy, name: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=policy.workers, thread_name_prefix=f"batch-{name}"
    )


class Batcher:
    def __init__(
        self,
        runner: ModelRunner,
        policy: BatchPolicy,
        *,
        name: str = "model",
        observer: BatchObserver | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.runner = runner
        self.policy = policy
        self.name = name
        self.stats = BatcherStats()
        self._observer = observer
        self._pending: list[WorkItem] = []
        # Runs `runner.run`: batch threads, or a compute process (`compute_process`).
        self._executor = executor or batch_threads(policy, name)
        # Created on first use, on the running loop.
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None  # set whenever the queue empties and work ends
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._closed = False
        self._row_seconds = 0.001  # moving average of compute time per sequence
        self._observed = True  # batches count in stats and metrics (not during warm-up)
        self._last_rows = 0  # sequences in the latest batch
        self._last_end = 0.0  # perf_counter when the latest batch ended

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._in_flight > 0

    def check_room(self, count: int) -> None:
        """RESOURCE_EXHAUSTED unless `count` more sequences fit in the queue now. Called before a
        request is decoded, so that under overload a refusal costs next to nothing."""
        if len(self._pending) + count > self.policy.max_queue:
            self._drop_dead()
            if len(self._pending) + count > self.policy.max_queue:
                self._refuse(count)

    def _drop_dead(self) -> None:
        """Take out of the queue what nobody waits for any more (cancelled, or past its
        deadline), which otherwise stays until a batch is formed: a full-looking queue must not
        refuse live requests for the sake of dead ones."""
        now = asyncio.get_running_loop().time()
        self._pending = [item for item in self._pending if not self._dead(item, now)]

    def _dead(self, item: WorkItem, now: float) -> bool:
        """True (and counted as dropped) if nobody waits for this work: its caller gave up, or
        its deadline passed (the caller is then told so)."""
        if item.future.done():
            self.stats.dropped += 1
            return True
        if item.deadline is not None and item.deadline <= now:
            self.stats.dropped += 1
            item.future.set_exception(
                DeadlineExceeded("deadline passed while the request was queued")
            )
            return True
        return False

    def submit_many(
        self, sequences: Sequence[np.ndarray], *, deadline: float | None = None
    ) -> list[asyncio.Future[RowResult]]:
        """Queue several sequences at once: all are taken, or none (RESOURCE_EXHAUSTED)."""
        self.check_room(len(sequences))
        return [self.submit_nowait(x, deadline=deadline) for x in sequences]

    def _refuse(self, count: int) -> None:
        if count > self.policy.max_queue:  # never fits: no retry hint, since waiting cannot help
            raise ResourceExhausted(
                f"{count} sequences in one request but the queue of model {self.name} holds "
                f"{self.policy.max_queue}; split the request"
            )
        # Hint: about the time the queue ahead takes to drain at the recent pace.
        drain = len(self._pending) * self._row_seconds
        raise ResourceExhausted(
            f"queue of model {self.name} is full ({len(self._pending)} of "
            f"{self.policy.max_queue} sequences waiting, {count} more asked); retry with backoff",
            retry_after=min(max(drain, 0.01), 5.0),
        )

    def submit_nowait(
        self,
        x: np.ndarray,
        states: Sequence[np.ndarray] | None = None,
        *,
        deadline: float | None = None,
        session: object | None = None,
    ) -> asyncio.Future[RowResult]:
        """Queue one sequence; the returned future resolves to its result."""
        if self._closed:
            raise Unavailable(f"model {self.name} is shutting down")
        if len(self._pending) >= self.policy.max_queue:
            self.check_room(1)
        loop = asyncio.get_running_loop()
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
            self._idle = asyncio.Event()
            for _ in range(self.policy.workers):
                self._start_worker(loop)
        future: asyncio.Future[RowResult] = loop.create_future()
        self._pending.append(WorkItem(x, states, future, deadline, time.perf_counter(), session))
        self._wakeup.set()
        return future

    @contextlib.contextmanager
    def unobserved(self) -> Iterator[None]:
        """Batches run meanwhile (warm-up traffic) stay out of stats and metrics."""
        self._observed = False
        try:
            yield
        finally:
            self._observed = True

    async def warm_up(self, sequences: Sequence[np.ndarray]) -> None:
        """Run each sequence on the worker threads, outside the stats: the threads' first
        TensorFlow calls (per-thread setup) happen here instead of in a client's request. The
        calls of one sequence go out together, so that the pool starts all its threads (one at a
        time, they would all land on the first)."""
        loop = asyncio.get_running_loop()
        for x in sequences:
            await asyncio.gather(
                *(
                    loop.run_in_executor(self._executor, self.runner.run, [x], [None])
                    for _ in range(self.policy.workers)
                )
            )

    def _start_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._work())
        task.add_done_callback(self._worker_ended)
        self._tasks.append(task)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A worker that dies (a bug, or killed mid-batch) is replaced; its batch was requeued."""
        if task in self._tasks:
            self._tasks.remove(task)
        if self._closed:
            return
        why = "cancelled" if task.cancelled() else repr(task.exception())
        log.error("batch worker of %s stopped (%s); starting a new one", self.name, why)
        self.stats.restarts += 1
        self._start_worker(task.get_loop())

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop the workers."""
        self._closed = True
        while self.busy and self._idle is not None:
            self._idle.clear()
            await self._idle.wait()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # (not `await task`: suppressing its CancelledError would eat our own)
            await asyncio.wait(tasks)
        self._executor.shutdown(wait=True)

    async def _work(self) -> None:
        assert self._wakeup is not None
        assert self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if not self._in_flight:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._maybe_wait_for_more(loop)
            batch = self._take_batch(loop.time())
            if not batch:
                continue
            self._in_flight += 1
            try:
                started = time.perf_counter()
                computed: list[int] = []
                results = await loop.run_in_executor(
                    self._executor,
                    self.runner.run,
                    [item.x for item in batch],
                    [item.states for item in batch],
                    computed,
                )
                self._record(batch, started, sum(computed))
            except BaseException as exc:
                # This worker is going away mid-batch: what is unanswered goes back to the front
                # of the queue for the worker that replaces it. If the work itself killed it, each
                # item runs alone from then on, and one that kills a worker again fails (or a
                # sequence that kills every worker would do so forever, with its neighbours).
                unanswered = [item for item in batch if not item.future.done()]
                for item in unanswered:
                    if isinstance(exc, asyncio.CancelledError):
                        continue  # stopped from outside: not the work's fault
                    item.crashes += 1
                    if item.crashes >= MAX_CRASHES:
                        item.future.set_exception(
                            InferenceFailed(
                                f"inference failed: {item.crashes} batch workers died running "
                                "this sequence"
                            )
                        )
                self._pending[:0] = [item for item in unanswered if not item.future.done()]
                raise
            finally:
                self._in_flight -= 1
                self._last_rows, self._last_end = len(batch), time.perf_counter()
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    async def _maybe_wait_for_more(self, loop: asyncio.AbstractEventLoop) -> None:
        policy = self.policy
        if len(self._pending) >= policy.max_batch_size:
            return
        delay = policy.max_delay
        if delay > 0:
            age = time.perf_counter() - self._pending[0].enqueued
            if age < delay:
                await asyncio.sleep(delay - age)
        if policy.gather > 0:
            await self._gather()

    async def _gather(self) -> None:
        """Under load, wait for a fuller batch while sequences keep coming: the event loop
        answers and receives meanwhile, and one batch of many costs far less than several small
        ones. Not after a batch of one (a lone client would only wait) nor after a quiet spell."""
        policy = self.policy
        now = time.perf_counter()
        if not self._pending or self._last_rows < 2 or now - self._last_end > policy.gather:
            return  # (another worker may have taken what was queued while this one slept)
        until = self._pending[0].enqueued + policy.gather
        while self._pending and len(self._pending) < policy.max_batch_size and now < until:
            quiet = now - self._pending[-1].enqueued
            if quiet >= policy.gather_gap:
                return
            await asyncio.sleep(min(until - now, policy.gather_gap - quiet))
            now = time.perf_counter()

    def _take_batch(self, now: float) -> list[WorkItem]:
        # Only the oldest few batches' worth of work is considered, so forming a batch costs the
        # same with a thousand sequences waiting as with fifty.
        window = max(4 * self.policy.max_batch_size, 64)
        pending = self._pending
        live: list[WorkItem] = []
        scanned = 0
        while scanned < len(pending) and len(live) < window:
            item = pending[scanned]
            scanned += 1
            if not self._dead(item, now):
                live.append(item)
        rest = pending[scanned:]
        if not live:
            self._pending = rest
            return []
        anchor = live[0]
        length = len(anchor.x)
        policy = self.policy
        if anchor.crashes:
            candidates = []  # a worker died running it: alone, so only it can fail
        elif policy.equal_lengths_only:
            candidates = [it for it in live[1:] if len(it.x) == length]
        else:
            candidates = sorted(live[1:], key=lambda it: abs(len(it.x) - length))
        batch = [anchor]
        sessions = {anchor.session} if anchor.session is not None else set()
        longest = length
        for item in candidates:
            if len(batch) >= policy.max_batch_size:
                break
            if item.crashes:
                continue
            padded = max(longest, len(item.x))
            if padded * (len(batch) + 1) > policy.max_batch_timesteps:
                continue
            joining = policy.cost(len(batch) + 1, padded) - policy.cost(len(batch), longest)
            if joining > policy.cost(1, len(item.x)):
                continue  # cheaper to run it with sequences of its own length
            if item.session is not None:
                if item.session in sessions:  # one chunk per session per batch, in order
                    continue
                sessions.add(item.session)
            batch.append(item)
            longest = padded
        taken = set(map(id, batch))
        self._pending = [it for it in live if id(it) not in taken] + rest
        return batch

    def _record(self, batch: list[WorkItem], started: float, computed: int) -> None:
        if not self._observed:
            return
        lengths = [len(item.x) for item in batch]
        padded = self.runner.padded_length(lengths) * len(batch)
        stats = self.stats
        stats.batches += 1
        stats.rows += len(batch)
        stats.max_rows = max(stats.max_rows, len(batch))
        stats.real_timesteps += sum(lengths)
        stats.padded_timesteps += padded
        stats.computed_timesteps += computed
        seconds = time.perf_counter() - started
        self._row_seconds = 0.8 * self._row_seconds + 0.2 * seconds / len(batch)
        if self._observer is not None:
            waits = [started - item.enqueued for item in batch]
            self._observer(BatchStats(len(batch), sum(lengths), padded, computed, seconds), waits)
