"""Batch formation: grouping by length, bounds, eager dispatch, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from rnnserve.server.batching import MAX_CRASHES, Batcher, BatchPolicy
from rnnserve.server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ResourceExhausted,
    Unavailable,
)
from rnnserve.server.runner import RowResult


class RecordingRunner:
    """Answers each sequence with its length; records batches; can hold the first batch."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold_first:
            self.release.set()

    def run(
        self,
        sequences: Sequence[np.ndarray],
        states: Sequence[object],
        cells: list[int] | None = None,
    ) -> list[RowResult]:
        self.started.set()
        self.release.wait(10)
        self.batches.append([len(x) for x in sequences])
        return [RowResult([np.array([len(x)])], [False], []) for x in sequences]

    def padded_length(self, lengths: Sequence[int]) -> int:
        return max(lengths)


def seq(n: int) -> np.ndarray:
    return np.zeros((n, 2), np.float32)


async def _blocked_then(
    batcher: Batcher, runner: RecordingRunner, lengths: list[int], **kw: object
) -> list[asyncio.Future[RowResult]]:
    """Occupy the model with one sequence, queue `lengths` behind it, then let it go."""
    first = batcher.submit_nowait(seq(1))
    await asyncio.to_thread(runner.started.wait, 5)
    futures = [batcher.submit_nowait(seq(n), **kw) for n in lengths]  # type: ignore[arg-type]
    runner.release.set()
    await first
    return futures


def test_dispatches_at_once_when_idle() -> None:
    runner = RecordingRunner()
    batcher = Batcher(runner, BatchPolicy())  # type: ignore[arg-type]

    async def main() -> None:
        for n in (3, 5, 7):
            result = await batcher.submit_nowait(seq(n))
            assert int(result.heads[0][0]) == n
        await batcher.close()

    asyncio.run(main())
    assert runner.batches == [[3], [5], [7]]


def test_groups_by_length_within_row_and_cell_bounds() -> None:
    runner = RecordingRunner(hold_first=True)
    # Joining pays off up to 5x the sequence's own length.
    policy = BatchPolicy(max_batch_size=4, max_batch_timesteps=800, step_cost=4, row_cost=1)
    batcher = Batcher(runner, policy)  # type: ignore[arg-type]
    lengths = [10, 200, 12, 190, 11, 205, 9, 198, 13, 210]

    async def main() -> list[int]:
        futures = await _blocked_then(batcher, runner, lengths)
        got = [int((await f).heads[0][0]) for f in futures]
        await batcher.close()
        return got

    assert asyncio.run(main()) == lengths  # every answer reaches its own caller
    batches = runner.batches[1:]
    assert sorted(n for b in batches for n in b) == sorted(lengths)
    for batch in batches:
        assert len(batch) <= 4
        assert max(batch) * len(batch) <= 800
        assert max(batch) <= 5 * min(batch), f"short and long mixed: {batch}"
    assert max(len(b) for b in batches) > 1


def test_a_sequence_longer_than_the_cell_budget_still_runs_alone() -> None:
    runner = RecordingRunner()
    batcher = Batcher(runner, BatchPolicy(max_batch_timesteps=50))  # type: ignore[arg-type]

    async def main() -> None:
        await batcher.submit_nowait(seq(80))
        await batcher.close()

    asyncio.run(main())
    assert runner.batches == [[80]]


def test_max_delay_waits_for_a_fuller_batch() -> None:
    runner = RecordingRunner()
    # Seconds of slack for the second to come: the suite runs on busy machines.
    batcher = Batcher(runner, BatchPolicy(max_delay=1.0))  # type: ignore[arg-type]

    async def main() -> None:
        first = batcher.submit_nowait(seq(4))
        await asyncio.sleep(0.02)
        second = batcher.submit_nowait(seq(4))
        await asyncio.gather(first, second)
        await batcher.close()

    asyncio.run(main())
    assert runner.batches == [[4, 4]]


def test_gathering_under_load_waits_while_sequences_keep_coming() -> None:
    """After a batch of several, the next batch waits for more while they keep arriving (but
    at most `gather`); a lone client (batches of one) never waits."""
    runner = RecordingRunner()
    # Times in tenths of seconds, so that a busy machine's hiccups do not split the batches.
    batcher = Batcher(runner, BatchPolicy(gather=3.0, gather_gap=0.4))  # type: ignore[arg-type]

    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit_nowait(seq(3))  # a lone request: answered without waiting
        alone = loop.time() - started
        await asyncio.gather(*batcher.submit_many([seq(3), seq(3)]))  # a batch of two
        # Under load now: sequences trickling in every 50 ms join one batch...
        started = loop.time()
        futures = []
        for _ in range(6):
            futures.append(batcher.submit_nowait(seq(5)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*futures)
        trickle = loop.time() - started
        # ...and once they stop coming, the batch goes after a short gap, not the whole 3 s.
        started = loop.time()
        await asyncio.gather(*batcher.submit_many([seq(6), seq(6)]))
        gap = loop.time() - started
        await batcher.close()
        return alone, trickle, gap

    alone, trickle, gap = asyncio.run(main())
    assert runner.batches[:2] == [[3], [3, 3]]
    assert runner.batches[2] == [5] * 6, runner.batches
    assert runner.batches[3] == [6, 6], runner.batches
    assert alone < 0.35  # (the gap is 0.4 s: waiting would show)
    assert trickle < 2.5  # ended a gap after the last one came, well before 3 s
    assert gap < 2.5


def test_gathering_is_bounded_by_its_delay() -> None:
    runner = RecordingRunner()
    batcher = Batcher(runner, BatchPolicy(gather=0.05, gather_gap=0.03))  # type: ignore[arg-type]

    async def main() -> None:
        await asyncio.gather(*batcher.submit_many([seq(2), seq(2)]))
        futures = []
        for _ in range(20):  # one every 10 ms for 0.2 s: more than one gathering window
            futures.append(batcher.submit_nowait(seq(4)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*futures)
        await batcher.close()

    asyncio.run(main())
    later = runner.batches[1:]
    assert sum(map(len, later)) == 20
    assert len(later) >= 3, later  # a 50 ms window cannot hold 0.2 s of arrivals


def test_full_queue_refuses_at_once_and_submit_many_is_all_or_nothing() -> None:
    runner = RecordingRunner(hold_first=True)
    batcher = Batcher(runner, BatchPolicy(max_queue=3))  # type: ignore[arg-type]

    async def main() -> None:
        first = batcher.submit_nowait(seq(1))
        await asyncio.to_thread(runner.started.wait, 5)
        queued = batcher.submit_many([seq(2), seq(2)])
        with pytest.raises(ResourceExhausted, match=r"queue of model .* is full") as full:
            batcher.submit_many([seq(2), seq(2)])
        assert full.value.retry_after  # waiting helps: the client is told how long
        with pytest.raises(ResourceExhausted, match=r"holds 3; split the request") as never:
            batcher.submit_many([seq(2)] * 4)
        assert never.value.retry_after is None  # waiting cannot help
        assert batcher.queue_depth == 2  # nothing of the refused requests was queued
        queued.append(batcher.submit_nowait(seq(2)))
        with pytest.raises(ResourceExhausted):
            batcher.submit_nowait(seq(2))
        runner.release.set()
        await asyncio.gather(first, *queued)
        await batcher.close()

    asyncio.run(main())


def test_cancelled_and_expired_work_is_dropped_before_compute() -> None:
    runner = RecordingRunner(hold_first=True)
    batcher = Batcher(runner, BatchPolicy())  # type: ignore[arg-type]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = batcher.submit_nowait(seq(1))
        await asyncio.to_thread(runner.started.wait, 5)
        keep = batcher.submit_nowait(seq(5))
        cancelled = batcher.submit_nowait(seq(6))
        expired = batcher.submit_nowait(seq(7), deadline=loop.time() - 1)
        cancelled.cancel()
        runner.release.set()
        await first
        assert int((await keep).heads[0][0]) == 5
        with pytest.raises(DeadlineExceeded):
            await expired
        await batcher.close()

    asyncio.run(main())
    assert runner.batches == [[1], [5]]
    assert batcher.stats.dropped == 2


def test_two_chunks_of_one_session_never_share_a_batch() -> None:
    runner = RecordingRunner(hold_first=True)
    batcher = Batcher(runner, BatchPolicy())  # type: ignore[arg-type]
    session_a, session_b = object(), object()

    async def main() -> None:
        first = batcher.submit_nowait(seq(1))
        await asyncio.to_thread(runner.started.wait, 5)
        futures = [
            batcher.submit_nowait(seq(3), session=session_a),
            batcher.submit_nowait(seq(4), session=session_a),
            batcher.submit_nowait(seq(5), session=session_b),
        ]
        runner.release.set()
        await asyncio.gather(first, *futures)
        await batcher.close()

    asyncio.run(main())
    assert runner.batches[1:] == [[3, 5], [4]]  # in order, a's second chunk waits


def test_equal_lengths_only_policy() -> None:
    runner = RecordingRunner(hold_first=True)
    batcher = Batcher(runner, BatchPolicy(equal_lengths_only=True))  # type: ignore[arg-type]

    async def main() -> None:
        await asyncio.gather(*await _blocked_then(batcher, runner, [5, 6, 5, 6, 7]))
        await batcher.close()

    asyncio.run(main())
    assert runner.batches[1:] == [[5, 5], [6, 6], [7]]


class CrashingRunner(RecordingRunner):
    """Kills the batch worker that runs a sequence of length 13 (a bug outside the runner's own
    error handling); answers the others."""

    attempts: list[list[int]]

    def run(
        self,
        sequences: Sequence[np.ndarray],
        states: Sequence[object],
        cells: list[int] | None = None,
    ) -> list[RowResult]:
        self.attempts.append(sorted(len(x) for x in sequences))
        if any(len(x) == 13 for x in sequences):
            raise RuntimeError("worker killed")
        return super().run(sequences, states, cells)


def test_work_that_kills_every_worker_fails_and_the_rest_is_served() -> None:
    runner = CrashingRunner()
    runner.attempts = []
    batcher = Batcher(runner, BatchPolicy())  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(InferenceFailed, match="2 batch workers died"):
            await asyncio.wait_for(batcher.submit_nowait(seq(13)), 10)
        assert batcher.stats.restarts == MAX_CRASHES
        assert int((await batcher.submit_nowait(seq(5))).heads[0][0]) == 5  # still serving
        # Batched with the killer, its neighbours die with it once, then run alone and succeed.
        runner.release.clear()
        runner.started.clear()
        blocker = batcher.submit_nowait(seq(1))
        await asyncio.to_thread(runner.started.wait, 5)
        killer, *innocent = [batcher.submit_nowait(seq(n)) for n in (13, 12, 14)]
        runner.release.set()
        await blocker
        with pytest.raises(InferenceFailed):
            await asyncio.wait_for(killer, 10)
        assert [int(r.heads[0][0]) for r in await asyncio.gather(*innocent)] == [12, 14]
        assert [12, 13, 14] in runner.attempts  # they did share the batch the killer broke
        await batcher.close()

    asyncio.run(main())


def test_a_worker_that_finds_the_queue_emptied_while_it_waited_goes_on() -> None:
    """Two workers wake for the same work and both wait `max_delay`; the first takes it all, and
    the second must find the queue empty without failing (a dead worker is restarted, logged as
    an error and counted)."""
    runner = RecordingRunner()
    policy = BatchPolicy(workers=2, max_delay=0.01, gather=0.05)
    batcher = Batcher(runner, policy)  # type: ignore[arg-type]

    async def main() -> None:
        await asyncio.gather(*batcher.submit_many([seq(2), seq(2)]))  # under load from here
        await asyncio.gather(*batcher.submit_many([seq(3)] * 4))
        await asyncio.sleep(0.1)
        await batcher.close()

    asyncio.run(main())
    assert sum(map(len, runner.batches)) == 6
    assert batcher.stats.restarts == 0


def test_a_closed_batcher_refuses_new_work_as_unavailable() -> None:
    """A version that unloads finishes what it queued, then refuses (UNAVAILABLE: another
    version or replica can take it; the client retries)."""
    runner = RecordingRunner()
    batcher = Batcher(runner, BatchPolicy(), name="m:1")  # type: ignore[arg-type]

    async def main() -> None:
        await batcher.submit_nowait(seq(3))
        await batcher.close()
        with pytest.raises(Unavailable, match="model m:1 is shutting down"):
            batcher.submit_nowait(seq(3))

    asyncio.run(main())
    assert runner.batches == [[3]]


def test_dead_work_does_not_fill_the_queue_for_live_requests() -> None:
    """Cancelled or expired sequences wait in the queue until a batch is formed; while the
    model is busy they must not make it refuse live requests as full."""
    runner = RecordingRunner(hold_first=True)
    batcher = Batcher(runner, BatchPolicy(max_queue=3))  # type: ignore[arg-type]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = batcher.submit_nowait(seq(1))
        await asyncio.to_thread(runner.started.wait, 5)
        gone = batcher.submit_many([seq(2), seq(2)])
        expired = batcher.submit_nowait(seq(2), deadline=loop.time() + 0.01)
        for future in gone:
            future.cancel()
        await asyncio.sleep(0.05)
        live = batcher.submit_many([seq(3), seq(3)])  # refused as full before
        assert batcher.queue_depth == 2
        with pytest.raises(DeadlineExceeded):
            await expired
        runner.release.set()
        await asyncio.gather(first, *live)
        assert [b for b in runner.batches if 2 in b] == []  # the dead ones never ran
        await batcher.close()

    asyncio.run(main())


def test_close_lets_its_callers_cancellation_through() -> None:
    """`close()` cancels the workers and waits for them; a cancellation of its own caller (a
    shutdown stopping the repository's watch while it unloads a version) must go through, not be
    taken for a worker's and swallowed (the watch then polled on, and the shutdown hung)."""
    batcher = Batcher(RecordingRunner(), BatchPolicy())  # type: ignore[arg-type]

    async def main() -> None:
        await batcher.submit_nowait(seq(3))  # the workers run

        async def unloads() -> None:
            await batcher.close()
            await asyncio.sleep(3600)  # the next poll, which a cancelled watch never reaches

        caller = asyncio.ensure_future(unloads())
        for _ in range(1000):  # until the caller is in close(), waiting for its workers
            if batcher._closed:
                break
            await asyncio.sleep(0)
        assert batcher._closed
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 5)
        assert caller.cancelled()

    asyncio.run(main())
