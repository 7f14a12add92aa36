"""The blocking client's session releases gRPC's request-consumer thread on every exit path.

gRPC runs a daemon thread per bidirectional call that pulls requests from the session's queue;
unless the session puts the closing sentinel, that thread blocks in `queue.get` forever. A real
server refuses to stream a Bidirectional model (FAILED_PRECONDITION), rejects a chunk of the
wrong width (INVALID_ARGUMENT), and sees a cancel when the `with` block raises."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.client import Client
from rnnserve.client.connection import NO_RETRY

import zoo
from conftest import RunningServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root: Path = tmp_path_factory.mktemp("sessions")
    zoo.write_repository(root, ["bidirectional", "lstm_masked"])
    with RunningServer(model_dir=str(root), warmup=False) as running:
        yield running


def _consumers() -> int:
    """Threads currently inside gRPC's request-iterator consumer."""
    count = 0
    for frame in sys._current_frames().values():
        f = frame
        while f is not None:
            if f.f_code.co_name == "consume_request_iterator":
                count += 1
                break
            f = f.f_back
    return count


def _settles_to(expected: int, within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    while (now := _consumers()) > expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


class Boom(Exception):
    pass


def _open_refused(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.session("bidirectional")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _send_rejected(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err, client.session("lstm_masked") as session:
        session.send(np.zeros((3, zoo.D + 1), np.float32))  # wrong feature width
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _block_raises(client: Client) -> None:
    def body() -> None:
        with client.session("lstm_masked") as session:
            session.send(np.ones((3, zoo.D), np.float32))
            raise Boom

    with pytest.raises(Boom):
        body()


def _closed_cleanly(client: Client) -> None:
    with client.session("lstm_masked") as session:
        session.send(np.ones((3, zoo.D), np.float32))


@pytest.mark.parametrize(
    "path",
    [_open_refused, _send_rejected, _block_raises, _closed_cleanly],
    ids=["open-refused", "send-rejected", "block-raises", "closed"],
)
def test_session_releases_request_thread(
    server: RunningServer, path: Callable[[Client], None]
) -> None:
    before = _consumers()
    with Client(server.target, retry=NO_RETRY, timeout=30) as client:
        for _ in range(5):
            path(client)
        assert client.health()
    # Other tests' threads may end meanwhile (the count is process-wide): none may be added.
    assert _settles_to(before) <= before
