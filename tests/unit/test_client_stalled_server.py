"""A session's close() and detach() against a server that opens the stream and then never answers
again: both give up after their timeout instead of waiting for the stream's own deadline, close()
says the session may still be on the server, and both leave the call finished."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from fake_server import serving

from rnnserve.client import AsyncClient, Client
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

TIMEOUT = 0.5  # the close's own; the stream itself has none
TOO_LONG = 20.0  # a close that waits for the stream's end would take until the server stops


class _Stalling(pb_grpc.InferenceServicer):
    """Opens every session, then reads on and answers nothing until the client leaves."""

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        async for request in requests:
            if request.HasField("open"):
                yield pb.StreamResponse(opened=pb.SessionInfo(session_id="s1", model_name="m"))
                break
        await asyncio.sleep(TOO_LONG)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with serving(_Stalling()) as address:
        yield address


def test_a_blocking_close_gives_up_after_its_timeout(target: str) -> None:
    with Client(target, timeout=TOO_LONG) as client:
        session = client.session("m")
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"session s1 within 0\.5s; .* may still be on"):
            session.close(timeout=TIMEOUT)
        assert time.monotonic() - started < TOO_LONG / 2
        assert session._call.done()


def test_a_blocking_detach_gives_up_after_its_timeout_and_keeps_the_id(target: str) -> None:
    with Client(target, timeout=TIMEOUT) as client:  # the client's timeout is the default
        session = client.session("m", timeout=TOO_LONG)
        started = time.monotonic()
        assert session.detach() == "s1"
        assert time.monotonic() - started < TOO_LONG / 2
        assert session._call.done()


def test_an_asyncio_close_and_detach_give_up_after_their_timeout(target: str) -> None:
    async def main() -> tuple[float, float, bool, bool, str]:
        async with AsyncClient(target, timeout=TOO_LONG) as client:
            closing = await client.session("m").open()
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=r"session s1 within 0\.5s"):
                await closing.close(timeout=TIMEOUT)
            closed_in = time.monotonic() - started
            detaching = await client.session("m").open()
            started = time.monotonic()
            kept = await detaching.detach(timeout=TIMEOUT)
            detached_in = time.monotonic() - started
            return closed_in, detached_in, closing._call.done(), detaching._call.done(), kept

    closed_in, detached_in, closed_done, detached_done, kept = asyncio.run(main())
    assert closed_in < TOO_LONG / 2
    assert detached_in < TOO_LONG / 2
    assert closed_done
    assert detached_done
    assert kept == "s1"
