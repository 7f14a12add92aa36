"""Shared fixtures: a real server on 127.0.0.1:0 in a background thread; the architecture zoo."""

from __future__ import annotations

import asyncio
import os
import threading
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.server.app import Server
from rnnserve.server.settings import Settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


class RunningServer:
    """A real rnnserve server on its own event loop thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        settings.setdefault("metrics_port", 0)
        self.settings = Settings(**settings)
        self.loop = asyncio.new_event_loop()
        self.server = Server(self.settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RunningServer:
        self._thread.start()
        self.run(self.server.start(), timeout=300)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 1.0) -> None:
        if self._thread.is_alive():
            self.run(self.server.stop(grace), timeout=60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's loop (to inspect or change server state)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def batcher_stats(self, model: str) -> Any:
        return self.call(lambda: self.server.repository.resolve(model).batcher.stats)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample on /metrics: (name, sorted labels) -> value."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start servers with given settings; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def start(**settings: Any) -> RunningServer:
        server = RunningServer(**settings).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def zoo_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Every architecture of tests/zoo.py, trained briefly and saved: (repository, models)."""
    import zoo

    root = tmp_path_factory.mktemp("zoo")
    return root, zoo.write_repository(root)


@pytest.fixture(scope="session")
def zoo_server(zoo_repository: tuple[Path, dict[str, Any]]) -> Iterator[RunningServer]:
    root, _ = zoo_repository
    # No XLA warm-up (15 models x 28 buckets); buckets compile once hot, as they would anyway.
    with RunningServer(model_dir=str(root), max_batch_size=64, warmup=False) as server:
        yield server
