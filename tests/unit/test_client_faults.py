"""The client against servers that misbehave or go away (a scripted fake server, so that each fault
happens when the test says): an open that is never answered, a stream the server ends with an
error, two chunks of one session sent at once, a call cut by the client's own close, and a server
that comes back after a long downtime. Each test failed on the client before its fix."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from fake_server import serving

from rnnserve.client import AsyncClient, Client
from rnnserve.client.connection import predict_request
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

CLOSED = "session s1 was closed by another call"
X = np.zeros((3, 2), np.float32)


class _Scripted(pb_grpc.InferenceServicer):
    """Sessions behave by their model's name: `silent` never answers the open, `ends` is ended
    by the server (NOT_FOUND) right after it opened, `slow` answers each chunk after 0.5 s.
    Predict answers after 1 s."""

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        steps = 0
        async for request in requests:
            if request.HasField("open"):
                model = request.open.model_name
                if model == "silent":
                    await asyncio.sleep(30)
                yield pb.StreamResponse(opened=pb.SessionInfo(session_id="s1", model_name=model))
                if model == "ends":
                    await context.abort(grpc.StatusCode.NOT_FOUND, CLOSED)
            elif request.close:
                yield pb.StreamResponse(closed=pb.SessionInfo(session_id="s1"))
                return
            elif request.HasField("chunk"):
                await asyncio.sleep(0.5)
                steps += 3
                yield pb.StreamResponse(step=pb.StepResponse(session_id="s1", steps=steps))

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        await asyncio.sleep(1.0)
        return pb.PredictResponse()


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with serving(_Scripted()) as address:
        yield address


def test_an_open_without_answer_gives_up_after_the_clients_timeout(target: str) -> None:
    """It used to wait for as long as the stream's own deadline (none by default): forever."""
    with Client(target, timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no answer to the session's open within 1s"):
            client.session("silent")
        assert time.monotonic() - started < 5

    async def run() -> None:
        async with AsyncClient(target, timeout=1.0) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="no answer to the session's open"):
                async with client.session("silent"):
                    pass
            assert time.monotonic() - started < 5

    asyncio.run(run())


def test_a_stream_the_server_ended_raises_the_servers_error_in_asyncio(target: str) -> None:
    """The next send() raised `InvalidStateError: RPC already finished` instead of the status
    the server ended the stream with; close() too. The blocking client always said why."""

    async def run() -> None:
        async with AsyncClient(target) as client:
            s = client.session("ends")
            await s.open()
            await asyncio.sleep(0.3)  # the server has ended the call by now
            with pytest.raises(grpc.aio.AioRpcError) as sent:
                await s.send(X)
            assert sent.value.code() == grpc.StatusCode.NOT_FOUND
            assert sent.value.details() == CLOSED
            s = client.session("ends")
            await s.open()
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as closing:
                await s.close()
            assert closing.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(run())
    with Client(target) as client:
        session = client.session("ends")
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as sent:
            session.send(X)
        assert sent.value.code() == grpc.StatusCode.NOT_FOUND


def test_two_chunks_of_one_session_at_once_are_refused_in_words(target: str) -> None:
    """Both used to fail inside gRPC ("Internal error from Core", or a ValueError asking to
    report a gRPC bug), and the stream with them."""
    with Client(target) as client, client.session("slow") as session:
        first: list[object] = []
        sender = threading.Thread(target=lambda: first.append(session.send(X)))
        sender.start()
        time.sleep(0.1)
        with pytest.raises(RuntimeError, match="one at a time"):
            session.send(X)
        sender.join(10)
        assert session.send(X).total_steps == 6  # the first went through; the stream lives

    async def run() -> None:
        async with AsyncClient(target) as client, client.session("slow") as s:
            results = await asyncio.gather(s.send(X), s.send(X), return_exceptions=True)
            assert results[0].total_steps == 3  # type: ignore[union-attr]
            assert isinstance(results[1], RuntimeError)
            assert "one at a time" in str(results[1])
            assert (await s.send(X)).total_steps == 6
            with pytest.raises(RuntimeError, match="opened already"):
                await s.open()  # used to open a second session and leak the first stream

    asyncio.run(run())


def test_a_call_cut_by_the_clients_own_close_is_not_retried(target: str) -> None:
    """CANCELLED is retried as a call the server shed, but the client's own close() cancels
    too: the retry then failed with `ValueError: Cannot invoke RPC on closed channel!`."""
    client = Client(target, timeout=10)
    timer = threading.Timer(0.3, client.close)
    timer.start()
    with pytest.raises(grpc.RpcError) as cut:
        client.predict("m", [X])
    timer.join()
    assert cut.value.code() == grpc.StatusCode.CANCELLED


class _Answering(pb_grpc.InferenceServicer):
    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        return pb.PredictResponse(model_name="m")


def _serve_on(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(_Answering(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


def test_a_client_kept_through_a_long_server_downtime_works_soon_after_it_is_back() -> None:
    """gRPC's reconnect backoff grows to 120 s, failing every call at once meanwhile: after 16 s
    down, a kept client failed for ~10 s more once the server was back (~20 s after 75 s)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _serve_on(port)
    with Client(f"127.0.0.1:{port}", timeout=5) as client:
        client.predict("m", [X])
        server.stop(None).wait(10)
        down_until = time.monotonic() + 16
        while time.monotonic() < down_until:  # a client that keeps trying, as one in use does
            with pytest.raises(grpc.RpcError):
                client.predict("m", [X])
            time.sleep(0.5)
        server = _serve_on(port)
        try:
            back = time.monotonic()
            refused: list[grpc.StatusCode] = []
            while not _answers(client, refused):
                assert time.monotonic() - back < 4, (
                    f"still refused 4 s after it came back: {refused}"
                )
                time.sleep(0.1)
            assert set(refused) <= {grpc.StatusCode.UNAVAILABLE}
        finally:
            server.stop(None).wait(10)


def _answers(client: Client, refused: list[grpc.StatusCode]) -> bool:
    try:
        client.predict("m", [X])
    except grpc.RpcError as err:
        refused.append(err.code())
        return False
    return True


def test_one_array_or_one_output_name_is_taken_as_meant() -> None:
    """One [T, D] array went as T sequences of [D] (refused by the server as a wrong shape), and
    `outputs="speaker"` as seven output names."""
    with pytest.raises(TypeError, match="a list of arrays, one per sequence"):
        predict_request(
            "m", np.zeros((5, 2), np.float32), version=0, output="default", top_k=0, outputs=None
        )  # type: ignore[arg-type]
    request = predict_request("m", [X], version=0, output="default", top_k=0, outputs="speaker")
    assert list(request.output_names) == ["speaker"]
