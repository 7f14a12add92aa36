"""Faults and overload: a model that raises on some inputs, a worker killed mid-batch, deadlines,
cancellation, a full queue. Each costs only the requests it concerns; the server keeps serving."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf

from rnnserve.client import AsyncClient, Client, RetryPolicy

import zoo

NO_RETRY = RetryPolicy(max_attempts=1)


@keras.saving.register_keras_serializable("rnnserve_tests")
class Tripwire(keras.layers.Layer):
    """Raises inside the compiled graph when any input value reaches 100 (a poisoned input)."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        check = tf.debugging.assert_less(tf.reduce_max(x), 100.0, message="tripwire")
        with tf.control_dependencies([check]):
            return tf.identity(x)


def _tripwire_repository(root: Path) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, zoo.D))
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.LSTM(6)(Tripwire()(inp))))
    (root / "tripwire" / "1").mkdir(parents=True)
    model.save(root / "tripwire" / "1" / "model.keras")
    return model


def test_a_poisoned_input_fails_alone(serve: Any, tmp_path: Path) -> None:
    model = _tripwire_repository(tmp_path / "models")
    server = serve(model_dir=str(tmp_path / "models"), warmup=False)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(10, zoo.D)).astype(np.float32) for _ in range(40)]
    poisoned = {3, 17, 31}
    for i in poisoned:
        xs[i][4, 1] = 500.0

    async def main() -> list[Any]:
        async with AsyncClient(server.target, retry=NO_RETRY) as client:
            calls = [client.predict("tripwire", [x]) for x in xs]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert server.batcher_stats("tripwire").max_rows > 1  # they shared batches
    for i, (x, result) in enumerate(zip(xs, results, strict=True)):
        if i in poisoned:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert result.code() == grpc.StatusCode.INTERNAL
            assert "inference failed" in result.details()
            assert "tripwire" not in result.details()  # TensorFlow's own text stays in the log
        else:
            assert not isinstance(result, BaseException), result
            want = np.asarray(model(x[None]))[0]
            np.testing.assert_allclose(result[0].output.sequence, want, atol=1e-5, rtol=0)
    with Client(server.target) as client:
        assert client.predict("tripwire", [xs[0]])[0].length == 10


def test_a_worker_killed_mid_batch_is_replaced_and_loses_nothing(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    server = serve(model_dir=str(root), max_batch_size=8, warmup=False)
    reference = zoo.Reference(zoo_repository[1]["lstm_masked"])
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(1500, zoo.D)).astype(np.float32) for _ in range(32)]
    results: list[Any] = []

    def send() -> None:
        with Client(server.target, retry=NO_RETRY, timeout=120) as client:
            results.extend(client.predict("lstm_masked", xs, output="sequence"))

    sender = threading.Thread(target=send)
    sender.start()
    batcher = server.call(lambda: server.server.repository.resolve("lstm_masked").batcher)
    deadline = time.monotonic() + 60
    while server.call(lambda: batcher._in_flight) == 0:  # wait until a batch is computing
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.call(lambda: [t.cancel() for t in batcher._tasks])
    sender.join(180)
    assert batcher.stats.restarts == 1
    lstm = (("model", "lstm_masked"), ("version", "1"))
    assert server.scrape()[("rnnserve_worker_restarts_total", lstm)] == 1
    assert len(results) == len(xs)
    for x, p in zip(xs, results, strict=True):
        np.testing.assert_allclose(p.output.sequence, reference(x)[0], atol=1e-5, rtol=0)


def test_expired_and_cancelled_requests_are_never_computed(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    server = serve(model_dir=str(root), max_batch_size=4, warmup=False)
    rng = np.random.default_rng(2)
    heavy = [rng.normal(size=(20000, zoo.D)).astype(np.float32) for _ in range(16)]
    marker = rng.normal(size=(77, zoo.D)).astype(np.float32)  # a length nothing else has

    batcher = server.call(lambda: server.server.repository.resolve("lstm_masked").batcher)

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not server.call(condition):
            assert time.monotonic() < deadline
            time.sleep(0.005)

    async def main() -> Any:
        async with AsyncClient(server.target, retry=NO_RETRY, timeout=120) as client:
            busy = asyncio.ensure_future(client.predict("lstm_masked", heavy))
            # The model is busy with the heavy request (seconds), the rest of it queued.
            await asyncio.to_thread(until, lambda: batcher._in_flight > 0)
            queued = server.call(lambda: batcher.queue_depth)
            late = client.predict("lstm_masked", [marker], timeout=0.2)
            doomed = asyncio.ensure_future(client.predict("lstm_masked", [marker]))
            await asyncio.to_thread(until, lambda: batcher.queue_depth > queued)
            doomed.cancel()
            expired = await asyncio.gather(late, return_exceptions=True)
            await busy
            return expired[0]

    expired = asyncio.run(main())
    assert isinstance(expired, grpc.aio.AioRpcError)
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = server.batcher_stats("lstm_masked")
    assert stats.dropped == 2
    lstm = (("model", "lstm_masked"), ("version", "1"))
    assert server.scrape()[("rnnserve_dropped_sequences_total", lstm)] == 2
    assert stats.real_timesteps == 16 * 20000  # the two short ones never ran
    assert (
        server.call(lambda: server.server.repository.resolve("lstm_masked").batcher.queue_depth)
        == 0
    )


def test_a_full_queue_answers_at_once_and_the_client_retries(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    server = serve(model_dir=str(root), max_queue=4, max_batch_size=2, warmup=False)
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(300, zoo.D)).astype(np.float32) for _ in range(40)]

    async def flood(retry: RetryPolicy) -> list[Any]:
        async with AsyncClient(server.target, retry=retry, timeout=120) as client:
            calls = [client.predict("lstm_masked", [x]) for x in xs]
            return await asyncio.gather(*calls, return_exceptions=True)

    refused = [r for r in asyncio.run(flood(NO_RETRY)) if isinstance(r, BaseException)]
    assert refused, "40 concurrent requests into a queue of 4 were all accepted"
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue of model lstm_masked:1 is full" in err.details()
        hint = dict(err.trailing_metadata() or ())
        assert float(hint["retry-after-ms"]) > 0
    patient = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.5)
    answers = asyncio.run(flood(patient))
    assert all(not isinstance(a, BaseException) for a in answers), answers
    assert (
        server.call(lambda: server.server.repository.resolve("lstm_masked").batcher.queue_depth)
        == 0
    )


def test_refusal_leaves_no_partial_work(serve: Any, zoo_repository: Any, tmp_path: Path) -> None:
    """A multi-sequence request refused by a full queue queues none of its sequences, and is told
    when to retry; one that could never fit is told to split, with no retry hint."""
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    server = serve(  # one worker
        model_dir=str(root), max_queue=3, max_request_timesteps=50000, warmup=False
    )
    batcher = server.call(lambda: server.server.repository.resolve("lstm_masked").batcher)
    rng = np.random.default_rng(4)
    long = rng.normal(size=(40000, zoo.D)).astype(np.float32)  # occupies the worker (seconds)
    fillers = [rng.normal(size=(5, zoo.D)).astype(np.float32) for _ in range(2)]
    answers: dict[str, Any] = {}
    # Connected before the long sequence starts: the fillers and the probes must reach the
    # server while it computes, and a connection made then (under load) could take longer than
    # the computing.
    clients = {
        name: Client(server.target, retry=NO_RETRY, timeout=120)
        for name in ("long", "fillers", "probe")
    }
    for client in clients.values():
        client.list_models()
    probe = clients["probe"]

    def send(name: str, xs: list[np.ndarray]) -> None:
        with clients[name] as client:
            answers[name] = client.predict("lstm_masked", xs)

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not server.call(condition):
            assert time.monotonic() < deadline
            time.sleep(0.01)

    senders = [threading.Thread(target=send, args=("long", [long]))]
    senders[0].start()
    until(lambda: batcher._in_flight == 1 and batcher.queue_depth == 0)  # computing it
    senders.append(threading.Thread(target=send, args=("fillers", fillers)))
    senders[1].start()
    until(lambda: batcher.queue_depth == 2)  # waiting behind it: room for one more
    with pytest.raises(grpc.RpcError) as err:
        probe.predict("lstm_masked", [np.ones((5, zoo.D))] * 2)
    assert server.call(lambda: batcher.queue_depth) == 2, "part of a refused request was queued"
    assert server.call(lambda: batcher._in_flight) == 1, "the long sequence ended too soon"
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue of model lstm_masked:1 is full (2 of 3 sequences waiting, 2 more asked)" in (
        err.value.details() or ""
    )
    assert float(dict(err.value.trailing_metadata() or ())["retry-after-ms"]) > 0
    # Over a per-request limit while the queue is full: told to split, with no retry hint,
    # since waiting cannot make it fit.
    with pytest.raises(grpc.RpcError) as err:
        probe.predict("lstm_masked", [np.ones((30000, zoo.D), np.float32)] * 2)
    probe.close()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "60000 timesteps in one request; the limit is 50000" in (err.value.details() or "")
    assert "retry-after-ms" not in dict(err.value.trailing_metadata() or ())
    assert server.call(lambda: batcher.queue_depth) == 2, "the queue was no longer full"
    for sender in senders:
        sender.join(120)
    assert [p.length for p in answers["long"]] == [40000]
    assert [p.length for p in answers["fillers"]] == [5, 5]

    with Client(server.target, retry=NO_RETRY) as client, pytest.raises(grpc.RpcError) as err:
        client.predict("lstm_masked", [np.ones((5, zoo.D))] * 5)  # empty queue, still too many
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "5 sequences in one request but the queue of model lstm_masked:1 holds 3" in (
        err.value.details() or ""
    )
    assert "retry-after-ms" not in dict(err.value.trailing_metadata() or ())
    assert server.batcher_stats("lstm_masked").rows == 3  # the long one and the two fillers
