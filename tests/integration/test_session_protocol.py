"""Sessions under misuse: a second chunk (or a close) while one is in flight, streams that break
the protocol, resuming under the wrong model, importing bad states. Each gets a clear status, and
the session is left as it was: nothing of a refused chunk is applied."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client, RetryPolicy
from rnnserve.client.tensors import to_tensor
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

import zoo

MODEL = "gru_steps"
NO_RETRY = RetryPolicy(max_attempts=1)


def _x(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(length, zoo.D)).astype(np.float32)


def _wait_for(server: Any, check: Any, what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not server.call(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _computing(server: Any, session_id: str) -> Any:
    """True once the session's chunk is in its model's queue (the session is busy from the
    moment the chunk is submitted until it is answered); the queue's depth alone does not tell
    the chunk from rows of other requests."""

    def check() -> bool:
        session = server.server.store.peek(session_id)
        return session is not None and session.busy

    return check


def _serving(serve: Any, root: Path, tmp_path: Path, **settings: Any) -> tuple[Any, Any]:
    """A server of MODEL alone (no warm-up), and that model's batcher."""
    repo = str(zoo.subset(root, [MODEL], tmp_path / "repo"))
    server = serve(model_dir=repo, warmup=False, **settings)
    return server, server.call(lambda: server.server.repository.resolve(MODEL).batcher)


def test_a_second_chunk_or_a_close_while_one_is_in_flight_is_refused(
    zoo_repository: tuple[Path, dict[str, Any]], serve: Any, tmp_path: Path
) -> None:
    root, models = zoo_repository
    server, batcher = _serving(serve, root, tmp_path)
    first, second = _x(30, 1), _x(5, 2)

    async def main() -> tuple[Any, ...]:
        async with AsyncClient(server.target, timeout=120) as client:
            info = await client.open_session(MODEL)
            # Occupy the model, so that the session's chunk waits in the queue behind it.
            heavy = asyncio.ensure_future(client.predict(MODEL, [_x(4000, 3)] * 16))
            await asyncio.to_thread(_wait_for, server, lambda: batcher._in_flight > 0, "busy")
            step = asyncio.ensure_future(client.step(info.session_id, first))
            await asyncio.to_thread(
                _wait_for, server, _computing(server, info.session_id), "queued"
            )
            refusals = []
            for call in (
                client.step(info.session_id, second),
                client.close_session(info.session_id),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    await call
                refusals.append(refused.value)
            done = await step
            await heavy
            after = await client.step(info.session_id, second)
            return refusals, done, after

    refusals, done, after = asyncio.run(main())
    for refused in refusals:
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "busy" in refused.details()
    assert done.total_steps == 30
    assert after.total_steps == 35  # the refused chunk was not applied
    reference = zoo.Reference(models[MODEL])
    want = reference(np.concatenate([first, second]))[0]
    np.testing.assert_allclose(after.output.steps, want[30:], rtol=0, atol=1e-5)


def _stream(target: str, messages: list[pb.StreamRequest]) -> tuple[list[str], grpc.RpcError]:
    kinds: list[str] = []

    def read(call: Any) -> None:
        for response in call:
            kinds.append(str(response.WhichOneof("kind")))

    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.InferenceStub(channel).Stream(iter(messages), timeout=60)
        with pytest.raises(grpc.RpcError) as failed:
            read(call)
    return kinds, failed.value


def test_streams_that_break_the_protocol_get_invalid_argument(zoo_server: Any) -> None:
    chunk = pb.StreamRequest(chunk=pb.Chunk(data=to_tensor(_x(3))))
    kinds, failed = _stream(zoo_server.target, [chunk])
    assert kinds == []
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message of a stream must be `open`" in failed.details()

    opening = pb.StreamRequest(open=pb.StreamOpen(model_name=MODEL))
    kinds, failed = _stream(zoo_server.target, [opening, opening])
    assert kinds == ["opened"]
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected a chunk or close message, got open" in failed.details()
    kinds, failed = _stream(zoo_server.target, [opening, pb.StreamRequest()])
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.details() == "expected a chunk or close message, got an empty message"


def test_a_stream_refused_at_open_leaves_no_session_behind(zoo_server: Any) -> None:
    """A new session whose options are refused is removed again: nobody learnt its id, so it
    would only hold a place against the session limit until it expired."""
    before = zoo_server.call(lambda: len(zoo_server.server.store))
    opening = pb.StreamRequest(open=pb.StreamOpen(model_name=MODEL, top_k=-1))
    kinds, failed = _stream(zoo_server.target, [opening])
    assert kinds == []
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k must be >= 0" in failed.details()
    assert zoo_server.call(lambda: len(zoo_server.server.store)) == before


def test_resuming_a_session_under_another_model_is_refused_and_keeps_it(zoo_server: Any) -> None:
    with Client(zoo_server.target, timeout=60) as client:
        info = client.open_session(MODEL)
        client.step(info.session_id, _x(4))
        wrong = pb.StreamRequest(
            open=pb.StreamOpen(session_id=info.session_id, model_name="lstm_masked")
        )
        kinds, failed = _stream(zoo_server.target, [wrong])
        assert kinds == []
        assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"belongs to model {MODEL}" in failed.details()
        # The session is untouched and goes on.
        assert client.step(info.session_id, _x(2)).total_steps == 6
        client.close_session(info.session_id)


def test_importing_a_bad_state_is_refused(zoo_server: Any) -> None:
    with Client(zoo_server.target, timeout=60) as client:
        info = client.open_session(MODEL)
        client.step(info.session_id, _x(4))
        good = client.export_session(info.session_id, remove=True)
        cases = {
            "names its model version": lambda s: s.ClearField("model_version"),
            "steps -1; expected 0 to": lambda s: setattr(s, "steps", -1),
            # A chunk added to it overflowed int64: the session broke, and so did saving them all.
            "steps 9223372036854775807; expected 0 to": lambda s: setattr(s, "steps", 2**63 - 1),
            # Finite as float64, Inf once stored as float32: every answer after it was NaN.
            "NaN or Inf (as float32)": lambda s: s.states[0].CopyFrom(
                to_tensor(np.full(len(np.frombuffer(s.states[0].data, np.float32)), 1e300))
            ),
            "NaN or Inf": lambda s: s.states[0].CopyFrom(
                to_tensor(np.full(len(np.frombuffer(s.states[0].data, np.float32)), np.nan))
            ),
            "needs state tensors of sizes": lambda s: s.states[0].CopyFrom(
                to_tensor(np.zeros(3, np.float32))
            ),
        }
        for phrase, damage in cases.items():
            state = pb.SessionState()
            state.CopyFrom(good)
            damage(state)
            with pytest.raises(grpc.RpcError) as refused:
                client.import_session(state)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, phrase
            assert phrase in refused.value.details()
        # The undamaged state still imports and continues from where it was.
        restored = client.import_session(good)
        assert restored.steps == 4
        assert client.step(restored.session_id, _x(1)).total_steps == 5
        client.close_session(restored.session_id)


def test_a_chunk_in_flight_at_shutdown_is_not_applied_and_the_session_survives(
    zoo_repository: tuple[Path, dict[str, Any]], serve: Any, tmp_path: Path
) -> None:
    """Shutdown saves the sessions once the grace for chunks in flight is over; a chunk still
    computing then is answered with an error and not applied, so the saved state and the
    client's view agree: the client sends the chunk again after the restart."""
    root, models = zoo_repository
    snapshot = str(tmp_path / "sessions.bin")
    server, batcher = _serving(serve, root, tmp_path, session_snapshot=snapshot)
    first, second = _x(4, 1), _x(6, 2)

    async def main() -> tuple[str, BaseException | Any]:
        async with AsyncClient(server.target, timeout=120, retry=NO_RETRY) as client:
            info = await client.open_session(MODEL)
            await client.step(info.session_id, first)
            heavy = asyncio.ensure_future(client.predict(MODEL, [_x(6000, 3)] * 16))
            await asyncio.to_thread(_wait_for, server, lambda: batcher._in_flight > 0, "busy")
            step = asyncio.ensure_future(client.step(info.session_id, second))
            await asyncio.to_thread(
                _wait_for, server, _computing(server, info.session_id), "queued"
            )
            await asyncio.to_thread(server.stop, 0.2)  # grace ends while the chunk waits
            outcome = (await asyncio.gather(step, return_exceptions=True))[0]
            await asyncio.gather(heavy, return_exceptions=True)
            return info.session_id, outcome

    session_id, outcome = asyncio.run(main())
    assert isinstance(outcome, grpc.RpcError), f"the chunk was answered: {outcome}"
    assert outcome.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

    restarted = serve(model_dir=str(tmp_path / "repo"), session_snapshot=snapshot, warmup=False)
    with Client(restarted.target, timeout=60) as client:
        step = client.step(session_id, second, offset=4)  # the saved state: 4 steps, not 10
        assert step.total_steps == 10
    want = zoo.Reference(models[MODEL])(np.concatenate([first, second]))[0]
    np.testing.assert_allclose(step.output.steps, want[4:], rtol=0, atol=1e-5)


def test_a_chunk_whose_stream_is_cancelled_counts_as_cancelled(
    zoo_repository: tuple[Path, dict[str, Any]], serve: Any, tmp_path: Path
) -> None:
    root, _ = zoo_repository
    server, batcher = _serving(serve, root, tmp_path)

    def chunks(code: str) -> float:
        labels = (("code", code), ("method", "StreamChunk"), ("model", MODEL), ("version", "1"))
        return server.scrape().get(("rnnserve_requests_total", labels), 0.0)

    async def main() -> None:
        async with AsyncClient(server.target, timeout=120) as client:
            heavy = asyncio.ensure_future(client.predict(MODEL, [_x(4000, 3)] * 16))
            await asyncio.to_thread(_wait_for, server, lambda: batcher._in_flight > 0, "busy")
            async with grpc.aio.insecure_channel(server.target) as channel:
                call = pb_grpc.InferenceStub(channel).Stream()
                await call.write(pb.StreamRequest(open=pb.StreamOpen(model_name=MODEL)))
                session_id = (await call.read()).opened.session_id
                await call.write(pb.StreamRequest(chunk=pb.Chunk(data=to_tensor(_x(5, 1)))))
                queued = _computing(server, session_id)
                await asyncio.to_thread(_wait_for, server, queued, "queued")
                call.cancel()
            await heavy

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while chunks("CANCELLED") < 1:
        assert time.monotonic() < deadline, "the cancelled chunk was not counted as CANCELLED"
        time.sleep(0.05)
    assert chunks("OK") == 0


def test_both_clients_end_a_session_stream_the_same_way_after_an_error(zoo_server: Any) -> None:
    """A refused chunk ends the stream, not the session: leaving the block then raises nothing
    more, a further send says the stream has ended, and the session resumes by id. The blocking
    and the asyncio client alike."""
    wrong = np.ones((3, zoo.D + 1), np.float32)
    good = _x(4, 5)

    with Client(zoo_server.target) as client:
        with client.session(MODEL) as session:
            with pytest.raises(grpc.RpcError) as refused:
                session.send(wrong)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(RuntimeError, match="has ended; resume the session"):
                session.send(good)
        with client.session(session_id=session.id) as resumed:
            assert resumed.send(good).total_steps == 4

    async def main() -> int:
        async with AsyncClient(zoo_server.target) as client:
            async with client.session(MODEL) as session:
                with pytest.raises(grpc.RpcError) as refused:
                    await session.send(wrong)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(RuntimeError, match="has ended; resume the session"):
                    await session.send(good)
            async with client.session(session_id=session.id) as resumed:
                return (await resumed.send(good)).total_steps

    assert asyncio.run(main()) == 4


def test_a_stream_whose_session_ends_elsewhere_is_ended_with_the_reason(
    zoo_repository: tuple[Path, dict[str, Any]], serve: Any, tmp_path: Path
) -> None:
    """A stream waiting for its next chunk does not outlive its session: when the session
    expires (a client that went quiet, or one that never closed its stream) or another caller
    closes it, the stream ends at once with NOT_FOUND saying why, instead of holding a call open
    on the server until the client goes away."""
    root, _ = zoo_repository
    server, _ = _serving(serve, root, tmp_path, session_ttl=3.0)
    finished = threading.Event()  # ends the request streams (they send `open`, then wait)

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.StreamOpen(model_name=MODEL))
        finished.wait()

    try:
        with grpc.insecure_channel(server.target) as channel, Client(server.target) as other:
            stub = pb_grpc.InferenceStub(channel)
            other.list_models()  # connected before the race with the TTL below
            for ending in ("closed", "expired"):
                call = stub.Stream(requests(), timeout=30)
                opened = next(call).opened
                started = time.monotonic()
                if ending == "closed":
                    other.close_session(opened.session_id)
                with pytest.raises(grpc.RpcError) as ended:
                    next(call)
                assert ended.value.code() == grpc.StatusCode.NOT_FOUND, ended.value
                assert f"session {opened.session_id}" in ended.value.details()
                assert ending in ended.value.details()
                assert time.monotonic() - started < 20  # the TTL (3 s), not the call's 30 s
    finally:
        finished.set()


def test_a_session_left_open_by_a_blocking_client_frees_its_thread(zoo_server: Any) -> None:
    """gRPC reads a blocking stream's requests on a thread of its own. A `Session` dropped
    without `close()`, or still open when its client closes, must end that thread, and the
    session itself stays on the server to resume."""

    def started(client: Client) -> tuple[Any, list[threading.Thread]]:
        with client.session(MODEL) as first:  # the server's own threads (it runs in process)
            first.send(_x(3, 1))
        before = set(threading.enumerate())
        session = client.session(MODEL)
        session.send(_x(3, 1))
        new = [t for t in threading.enumerate() if t not in before]
        assert new, "no request thread started"
        return session, new

    def all_end(threads: list[threading.Thread]) -> bool:
        for thread in threads:
            thread.join(timeout=10)
        return not any(thread.is_alive() for thread in threads)

    with Client(zoo_server.target) as client:
        client.list_models()  # the channel's own threads start here
        session, threads = started(client)
        session_id = session.id
        del session
        gc.collect()
        assert all_end(threads), threads
        with client.session(session_id=session_id) as resumed:
            assert resumed.send(_x(2, 2)).total_steps == 5

    client = Client(zoo_server.target)
    client.list_models()
    kept, threads = started(client)
    client.close()
    assert all_end(threads), threads
    with Client(zoo_server.target) as other, other.session(session_id=kept.id) as resumed:
        assert resumed.send(_x(2, 2)).total_steps == 5


def test_a_chunk_without_an_answer_in_time_ends_the_stream_not_the_session(
    zoo_repository: tuple[Path, dict[str, Any]], serve: Any, tmp_path: Path
) -> None:
    """`send(..., timeout=)` (by default the client's timeout) bounds the wait for a chunk's
    answer: past it the stream ends with TimeoutError, nothing of the chunk is applied, and the
    session resumes. The blocking and the asyncio client alike."""
    root, _ = zoo_repository
    server, batcher = _serving(serve, root, tmp_path)
    x = _x(6, 1)

    def occupied(client: Client) -> Any:
        """The model busy with a long batch, so that a chunk waits in the queue behind it."""
        heavy = concurrent.futures.ThreadPoolExecutor(1).submit(
            client.predict, MODEL, [_x(4000, 3)] * 16, timeout=120
        )
        _wait_for(server, lambda: batcher._in_flight > 0, "busy")
        return heavy

    with Client(server.target, timeout=0.3) as client:
        with client.session(MODEL) as session:
            heavy = occupied(client)
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=r"within 0\.3s; the stream of session"):
                session.send(x)
            assert time.monotonic() - started < 30  # the 0.3 s timeout, not the heavy 120 s
            assert len(heavy.result()) == 16
        with client.session(session_id=session.id) as resumed:
            assert resumed.steps == 0
            assert resumed.send(x, timeout=60).total_steps == 6

    async def main() -> tuple[int, int]:
        async with AsyncClient(server.target, timeout=0.3) as client:
            async with client.session(MODEL) as session:
                with Client(server.target) as other:
                    heavy = await asyncio.to_thread(occupied, other)
                    with pytest.raises(TimeoutError, match=r"within 0\.3s"):
                        await session.send(x)
                    await asyncio.to_thread(heavy.result)
            async with client.session(session_id=session.id) as resumed:
                return resumed.steps, (await resumed.send(x, timeout=60)).total_steps

    assert asyncio.run(main()) == (0, 6)


def test_shutdown_says_whether_a_session_outlives_the_server(
    zoo_repository: tuple[Path, dict[str, Any]], serve: Any, tmp_path: Path
) -> None:
    """A stream ended by shutdown is told to resume later only when the sessions are saved
    (`--session-snapshot`); without it the session ends with the server, and it says so."""
    root, _ = zoo_repository
    finished = threading.Event()

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.StreamOpen(model_name=MODEL))
        finished.wait()

    said = {}
    try:
        for saved in (False, True):
            snapshot = {"session_snapshot": str(tmp_path / "s.bin")} if saved else {}
            server, _ = _serving(serve, root, tmp_path / str(saved), **snapshot)
            with grpc.insecure_channel(server.target) as channel:
                call = pb_grpc.InferenceStub(channel).Stream(requests(), timeout=60)
                session_id = next(call).opened.session_id
                servicer = server.server.servicer
                _wait_for(server, lambda s=servicer: bool(s._waiting), "the stream to wait")
                server.call(servicer.drain)
                with pytest.raises(grpc.RpcError) as ended:
                    next(call)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            said[saved] = (ended.value.details() or "").replace(session_id, "<id>")
    finally:
        finished.set()
    assert said[True] == "server is shutting down; resume session <id> later"
    assert said[False] == (
        "server is shutting down; session <id> ends with it (the server keeps no "
        "--session-snapshot)"
    )


def test_a_stream_opened_with_an_unknown_id_says_how_to_create_one(zoo_server: Any) -> None:
    """A stream resumes sessions by id but never creates one of a given id (a mistyped id
    would start a fresh state in silence); the refusal says what does."""
    opening = pb.StreamRequest(open=pb.StreamOpen(model_name=MODEL, session_id="my-own-id"))
    kinds, failed = _stream(zoo_server.target, [opening])
    assert kinds == []
    assert failed.code() == grpc.StatusCode.NOT_FOUND
    assert failed.details() == (
        "session my-own-id not found; a stream's `open` with an id resumes an existing session: "
        "create one of your own id with OpenSession first, or open without an id"
    )
    with Client(zoo_server.target) as client:  # as it says: OpenSession, then the stream
        client.open_session(MODEL, session_id="my-own-id")
        with client.session(session_id="my-own-id") as session:
            assert session.send(_x(3)).total_steps == 3
