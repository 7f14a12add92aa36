"""Prometheus metrics, on their own registry and HTTP port.

Padding efficiency is one PromQL ratio:
`rate(rnnserve_real_timesteps_total[5m]) / rate(rnnserve_padded_timesteps_total[5m])` for the
batches as formed, and over `rnnserve_computed_timesteps_total` for what the model ran (XLA pads
each batch further, to a compiled bucket shape).
Queue depth and open sessions are read at scrape time, so the request path pays nothing for them;
per-request and per-batch series are plain tallies kept by the event loop (`tallies.py`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rnnserve.server.runner import BatchStats
from rnnserve.server.tallies import CounterTally, HistogramTally, Tallies

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_CELLS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


def _versions() -> dict[str, str]:
    """The versions that decide what a model computes and how it is served."""
    found = {}
    for label, packages in (
        ("version", ("rnnserve",)),
        ("tensorflow", ("tensorflow", "tensorflow-cpu")),
        ("grpcio", ("grpcio",)),
    ):
        for package in packages:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found[label] = importlib.metadata.version(package)
                break
        found.setdefault(label, "unknown")
    return found


UNKNOWN_MODEL = "_unknown"  # label for requests naming no served model (bounds cardinality)
disable_created_metrics()  # the *_created series only add noise to every counter


class _Live(Collector):
    """Series read from the batchers and the session store when Prometheus scrapes."""

    def __init__(
        self,
        batchers: Callable[[], Iterable[tuple[str, int, int, int, int]]],
        sessions: Callable[[], int],
    ) -> None:
        self._batchers = batchers  # (model, version, queue depth, dropped, worker restarts)
        self._sessions = sessions

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model", "version"]
        depth = GaugeMetricFamily(
            "rnnserve_queue_depth", "Sequences waiting to be batched", labels=labels
        )
        dropped = CounterMetricFamily(
            "rnnserve_dropped_sequences",
            "Sequences dropped before compute: their deadline passed or their client gave up",
            labels=labels,
        )
        restarts = CounterMetricFamily(
            "rnnserve_worker_restarts",
            "Batch workers that died (their batch was requeued) and were replaced",
            labels=labels,
        )
        for name, version, queued, dropped_count, restart_count in self._batchers():
            key = [name, str(version)]
            depth.add_metric(key, queued)
            dropped.add_metric(key, dropped_count)
            restarts.add_metric(key, restart_count)
        yield from (depth, dropped, restarts)
        yield GaugeMetricFamily("rnnserve_sessions_active", "Open sessions", value=self._sessions())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The process itself (memory, CPU, open files, start time) and what runs it.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("rnnserve_build", "The running rnnserve", registry=r).info(_versions())
        # Per request and per batch: tallies kept by the event loop, read at scrape time.
        self.requests = CounterTally(
            "rnnserve_requests",
            "RPCs (and stream chunks) answered, by status code",
            ("model", "version", "method", "code"),
        )
        self.request_seconds = HistogramTally(
            "rnnserve_request_duration_seconds",
            "Time from receiving an RPC (or stream chunk) to answering it",
            ("model", "method"),
            _LATENCY,
        )
        self.queue_seconds = HistogramTally(
            "rnnserve_queue_wait_seconds",
            "Time a sequence waited before its batch started",
            ("model", "version"),
            _LATENCY,
        )
        self.compute_seconds = HistogramTally(
            "rnnserve_batch_compute_seconds",
            "Time to compute one batch",
            ("model", "version"),
            _LATENCY,
        )
        self.batch_rows = HistogramTally(
            "rnnserve_batch_size", "Sequences per batch", ("model", "version"), _ROWS
        )
        self.batch_cells = HistogramTally(
            "rnnserve_batch_padded_timesteps",
            "Padded timesteps per batch (rows x longest)",
            ("model", "version"),
            _CELLS,
        )
        self.real_timesteps = CounterTally(
            "rnnserve_real_timesteps", "Timesteps of real data computed", ("model", "version")
        )
        self.padded_timesteps = CounterTally(
            "rnnserve_padded_timesteps",
            "Timesteps of batches as formed, padding included (rows x longest)",
            ("model", "version"),
        )
        self.computed_timesteps = CounterTally(
            "rnnserve_computed_timesteps",
            "Timesteps the model ran, padding to compiled (XLA) shapes included",
            ("model", "version"),
        )
        # Sampled by the server a few times a second (app.py); no labels.
        self.loop_lag = HistogramTally(
            "rnnserve_event_loop_lag_seconds",
            "How late a timer on the event loop fires: every RPC, batch and answer passes through "
            "that one loop, so every call waits about this long for it",
            (),
            _LATENCY,
        )
        self.loop_lag.observe_many((), ())  # the series exists (empty) from the start
        r.register(
            Tallies(
                [
                    self.loop_lag,
                    self.requests,
                    self.request_seconds,
                    self.queue_seconds,
                    self.compute_seconds,
                    self.batch_rows,
                    self.batch_cells,
                    self.real_timesteps,
                    self.padded_timesteps,
                    self.computed_timesteps,
                ]
            )
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
        self._request_keys: dict[tuple[Any, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._http: WSGIServer | None = None

    def live(
        self,
        batchers: Callable[[], Iterable[tuple[str, int, int, int, int]]],
        sessions: Callable[[], int],
    ) -> None:
        self.registry.register(_Live(batchers, sessions))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the /metrics HTTP server and free its port."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # ---- hooks ----

    def request(
        self, model: str, version: int, method: str, code: grpc.StatusCode, seconds: float
    ) -> None:
        key = (model, version, method, code)
        labels = self._request_keys.get(key)
        if labels is None:  # the set of keys is small; build their label tuples once
            labels = (model, str(version) if version else "", method, code.name), (model, method)
            self._request_keys[key] = labels
        self.requests.inc(labels[0])
        self.request_seconds.observe(labels[1], seconds)

    def batch_observer(
        self, model: str, version: int
    ) -> Callable[[BatchStats, Sequence[float]], None]:
        labels = (model, str(version))
        queue, compute = self.queue_seconds, self.compute_seconds
        rows, cells = self.batch_rows, self.batch_cells
        real, padded, computed = self.real_timesteps, self.padded_timesteps, self.computed_timesteps

        def observe(stats: BatchStats, waits: Sequence[float]) -> None:
            queue.observe_many(labels, waits)
            compute.observe(labels, stats.seconds)
            rows.observe(labels, stats.rows)
            cells.observe(labels, stats.padded_timesteps)
            real.inc(labels, stats.real_timesteps)
            padded.inc(labels, stats.padded_timesteps)
            computed.inc(labels, stats.computed_timesteps)

        return observe

    def model_event(self, model: str, version: int, event: str, seconds: float | None) -> None:
        key = (model, version)
        previous = self._states.pop(key, None)
        if previous is not None:
            self.model_state.remove(model, str(version), previous)
        if event == "failed":
            self.load_failures.labels(model).inc()
        if event == "unloaded":
            if previous is not None:
                with contextlib.suppress(KeyError):  # only versions that loaded have one
                    self.load_seconds.remove(model, str(version))
            return
        self._states[key] = event
        self.model_state.labels(model, str(version), event).set(1)
        if seconds is not None:
            self.load_seconds.labels(model, str(version)).set(seconds)
