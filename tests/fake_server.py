"""A scripted gRPC server for client tests: a servicer of ours on its own event loop thread, so
that a fault happens exactly when the test says."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import grpc

from rnnserve.v1 import inference_pb2_grpc as pb_grpc


@contextlib.contextmanager
def serving(servicer: pb_grpc.InferenceServicer) -> Iterator[str]:
    """Serve `servicer` on 127.0.0.1 (a free port) until the block ends; yields host:port."""
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    address: list[str] = []

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address.append(f"127.0.0.1:{port}")
        stop.append(asyncio.Event())
        ready.set()
        await stop[0].wait()
        await server.stop(grace=None)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield address[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)
