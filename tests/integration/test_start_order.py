"""What a starting server does with its gRPC port: refused while the models load (a client
connecting then is told at once, and retries), open once they are ready."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.server.app import Server
from rnnserve.server.repository import Repository
from rnnserve.server.settings import Settings

import zoo


def test_the_port_is_refused_while_models_load_and_open_once_they_are_ready(
    zoo_repository: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(
        model_dir=str(root), host="127.0.0.1", port=port, metrics_port=-1, warmup=False
    )
    loading = asyncio.Event()
    release = asyncio.Event()
    sync = Repository.sync

    async def held_sync(self: Repository) -> None:
        if not loading.is_set():  # the first scan, at start: held until the test has looked
            loading.set()
            await release.wait()
        await sync(self)

    monkeypatch.setattr(Repository, "sync", held_sync)

    async def main() -> int:
        server = Server(settings)
        starting = asyncio.create_task(server.start())
        await asyncio.wait_for(loading.wait(), 60)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        release.set()
        assert await asyncio.wait_for(starting, 120) == port
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                return answer.status
        finally:
            await server.stop(1.0)

    assert asyncio.run(main()) == health_pb2.HealthCheckResponse.SERVING
