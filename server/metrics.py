"""Prometheus metrics, on their own registry and HTTP port.

Padding efficiency is one PromQL ratio:
`rate(rnnserve_real_timesteps_total[5m]) / rate(rnnserve_padded_timesteps_total[5m])`.
Queue depth and open sessions are read at scrape time, so the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rnnserve.server.runner import BatchStats

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_CELLS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
UNKNOWN_MODEL = "_unknown"  # label for requests naming no served model (bounds cardinality)
disable_created_metrics()  # the *_created series only add noise to every counter


class _Live(Collector):
    """Gauges computed when Prometheus scrapes."""

    def __init__(
        self,
        queue_depths: Callable[[], Iterable[tuple[str, int, int]]],
        sessions: Callable[[], int],
    ) -> None:
        self._queue_depths = queue_depths
        self._sessions = sessions

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "rnnserve_queue_depth", "Sequences waiting to be batched", labels=["model", "version"]
        )
        for name, version, value in self._queue_depths():
            depth.add_metric([name, str(version)], value)
        yield depth
        yield GaugeMetricFamily("rnnserve_sessions_active", "Open sessions", value=self._sessions())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rnnserve_requests",
            "RPCs (and stream chunks) answered, by status code",
            ["model", "version", "method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "rnnserve_request_duration_seconds",
            "Time from receiving an RPC (or stream chunk) to answering it",
            ["model", "method"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "rnnserve_queue_wait_seconds",
            "Time a sequence waited before its batch started",
            ["model", "version"],
            buckets=_LATENCY,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "rnnserve_batch_compute_seconds",
            "Time to compute one batch",
            ["model", "version"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_rows = Histogram(
            "rnnserve_batch_size",
            "Sequences per batch",
            ["model", "version"],
            buckets=_ROWS,
            registry=r,
        )
        self.batch_cells = Histogram(
            "rnnserve_batch_padded_timesteps",
            "Padded timesteps per batch (rows x longest)",
            ["model", "version"],
            buckets=_CELLS,
            registry=r,
        )
        self.real_timesteps = Counter(
            "rnnserve_real_timesteps",
            "Timesteps of real data computed",
            ["model", "version"],
            registry=r,
        )
        self.padded_timesteps = Counter(
            "rnnserve_padded_timesteps",
            "Timesteps computed including padding",
            ["model", "version"],
            registry=r,
        )
        self.session_ends = Counter(
            "rnnserve_session_ends",
            "Sessions ended, by reason (closed, expired, lru, model_unloaded)",
            ["reason"],
            registry=r,
        )
        self.model_state = Gauge(
            "rnnserve_model_state",
            "1 for the state each model version is in",
            ["model", "version", "state"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "rnnserve_model_load_seconds",
            "Time to load, compile and warm up a model version",
            ["model", "version"],
            registry=r,
        )
        self.load_failures = Counter(
            "rnnserve_model_load_failures",
            "Model versions that failed to load",
            ["model"],
            registry=r,
        )
        self._states: dict[tuple[str, int], str] = {}
        self._request_children: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def live(
        self,
        queue_depths: Callable[[], Iterable[tuple[str, int, int]]],
        sessions: Callable[[], int],
    ) -> None:
        self.registry.register(_Live(queue_depths, sessions))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    # ---- hooks ----

    def request(
        self, model: str, version: int, method: str, code: grpc.StatusCode, seconds: float
    ) -> None:
        key = (model, version, method, code)
        children = self._request_children.get(key)
        if children is None:  # label lookups are slow; the set of keys is small
            counter = self.requests.labels(
                model, str(version) if version else "", method, code.name
            )
            children = (counter, self.request_seconds.labels(model, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def batch_observer(
        self, model: str, version: int
    ) -> Callable[[BatchStats, Sequence[float]], None]:
        labels = (model, str(version))
        queue = self.queue_seconds.labels(*labels)
        compute = self.compute_seconds.labels(*labels)
        rows = self.batch_rows.labels(*labels)
        cells = self.batch_cells.labels(*labels)
        real = self.real_timesteps.labels(*labels)
        padded = self.padded_timesteps.labels(*labels)

        def observe(stats: BatchStats, waits: Sequence[float]) -> None:
            for wait in waits:
                queue.observe(wait)
            compute.observe(stats.seconds)
            rows.observe(stats.rows)
            cells.observe(stats.padded_timesteps)
            real.inc(stats.real_timesteps)
            padded.inc(stats.padded_timesteps)

        return observe

    def model_event(self, model: str, version: int, event: str, seconds: float | None) -> None:
        key = (model, version)
        previous = self._states.pop(key, None)
        if previous is not None:
            self.model_state.remove(model, str(version), previous)
        if event == "failed":
            self.load_failures.labels(model).inc()
        if event == "unloaded":
            return
        self._states[key] = event
        self.model_state.labels(model, str(version), event).set(1)
        if seconds is not None:
            self.load_seconds.labels(model, str(version)).set(seconds)
