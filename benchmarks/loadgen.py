"""Closed-loop load generator for the rnnserve.v1 API, run in its own process (grpc.aio).

Modes (each prints one JSON document as its last stdout line; progress goes to stderr):

* ``predict`` — C concurrent in-flight `Predict` calls, one sequence per request, taken in a seeded
  order from a file of pre-serialized requests (so every server compared gets the same bytes).
  Warm-up period, then a measured period: throughput (requests/s, timesteps/s), latency p50/p99,
  errors by status code, a per-interval timeline (compile stalls show up there) and the CPU used
  by this process, the watched server process and the whole machine during the measured period.
* ``streams`` — S sessions, each one `Stream` RPC sending fixed-size chunks of real frames one at a
  time (next chunk after the previous answer): chunks/s, timesteps/s, chunk latency p50/p99.
* ``idle-sessions`` — N sessions opened with unary `OpenSession` plus one `StepSession` each, at
  bounded concurrency, then left open (for the server memory benchmark).
* ``first`` — the very first `Predict` on a fresh connection, then N sequential ones (warm-up).

Requests and responses travel as raw bytes (no protobuf parsing in the hot loop), so the load
process spends its CPU on gRPC itself.

    python benchmarks/loadgen.py predict --target 127.0.0.1:8500 --requests reqs.npz -c 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rnnserve.client.tensors import to_tensor
from rnnserve.v1 import inference_pb2 as pb

PREDICT = "/rnnserve.v1.Inference/Predict"
STREAM = "/rnnserve.v1.Inference/Stream"
OPEN = "/rnnserve.v1.Inference/OpenSession"
STEP = "/rnnserve.v1.Inference/StepSession"
MAX_MESSAGE = 64 * 1024 * 1024


def progress(message: str) -> None:
    print(f"[loadgen {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- request files ----


def write_requests(path: Path, requests: Sequence[bytes], timesteps: Sequence[int]) -> None:
    """Serialized requests in one .npz: `blob` (all bytes), `offsets`, `timesteps`."""
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in requests])]).astype(np.int64)
    blob = np.frombuffer(b"".join(requests), dtype=np.uint8)
    np.savez(path, blob=blob, offsets=offsets, timesteps=np.asarray(timesteps, np.int64))


def read_requests(path: Path) -> tuple[list[bytes], list[int]]:
    with np.load(path) as data:
        blob, offsets, steps = data["blob"].tobytes(), data["offsets"], data["timesteps"]
    bounds = offsets.tolist()
    return [blob[a:b] for a, b in itertools.pairwise(bounds)], steps.tolist()


def predict_request(model: str, sequence: np.ndarray) -> bytes:
    """The request rnnserve's own client sends for one sequence (default output mode)."""
    return pb.PredictRequest(model_name=model, sequences=[to_tensor(sequence)]).SerializeToString()


# ---- measurement ----


class CpuWatch:
    """CPU seconds used by this process, the watched processes and the machine over a window."""

    def __init__(self, pids: Sequence[int]) -> None:
        import psutil

        self._psutil = psutil
        self.procs = {"loadgen": psutil.Process(os.getpid())}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                self.procs[f"pid{pid}"] = psutil.Process(pid)
        self._start: dict[str, float] = {}
        self._start_threads: dict[tuple[str, int], float] = {}
        self._t0 = 0.0

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return float(
            t.user
            + t.system
            + getattr(t, "nice", 0.0)
            + getattr(t, "irq", 0.0)
            + getattr(t, "softirq", 0.0)
        )

    def _sample(self) -> tuple[dict[str, float], dict[tuple[str, int], float]]:
        """Per process, and per thread of each watched process: a Python server's busiest thread
        is its event loop, and near 1 core that loop is saturated."""
        sample = {"machine": self._busy()}
        threads: dict[tuple[str, int], float] = {}
        for name, proc in self.procs.items():
            try:
                c = proc.cpu_times()
                sample[name] = float(c.user + c.system)
                if name != "loadgen":
                    for t in proc.threads():
                        threads[(name, t.id)] = float(t.user_time + t.system_time)
            except self._psutil.Error:
                pass
        return sample, threads

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start, self._start_threads = self._sample()

    def stop(self) -> dict[str, float]:
        seconds = time.perf_counter() - self._t0
        end, end_threads = self._sample()
        cores = {k: round((end[k] - v) / seconds, 3) for k, v in self._start.items() if k in end}
        named = sum(v for k, v in cores.items() if k != "machine")
        cores["others"] = round(max(cores.get("machine", 0.0) - named, 0.0), 3)
        for name in self.procs:
            busiest = max(
                (
                    end_threads[key] - self._start_threads.get(key, 0.0)
                    for key in end_threads
                    if key[0] == name
                ),
                default=None,
            )
            if busiest is not None:
                cores[f"{name}_busiest_thread"] = round(busiest / seconds, 3)
        return cores


class Window:
    """The measured period, and what completed in it (counted when it ends inside [start, end)).

    The warm-up lasts at least `warmup` seconds; with `settle` > 0 it goes on (up to `settle` more
    seconds) until throughput has stopped moving: the last 3 seconds within `tolerance` of the 3
    before. Then `duration` seconds are measured.
    """

    def __init__(
        self,
        warmup: float,
        duration: float,
        bin_seconds: float = 1.0,
        settle: float = 0.0,
        tolerance: float = 0.1,
    ) -> None:
        self.t0 = time.perf_counter()
        self.warmup, self.duration, self.settle, self.tolerance = (
            warmup,
            duration,
            settle,
            tolerance,
        )
        self.bin_seconds = bin_seconds
        self.start = self.end = float("inf")
        self.opened = asyncio.Event()
        self.settled: bool | None = None
        self.latencies: list[float] = []
        self.completed = 0
        self.timesteps = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.warmup_errors: collections.Counter[str] = collections.Counter()
        self.timeline: collections.Counter[int] = collections.Counter()

    def _rate(self, first: int, last: int) -> float:
        return sum(self.timeline.get(i, 0) for i in range(first, last)) / (last - first)

    def _stable(self, now: float) -> bool:
        current = int((now - self.t0) / self.bin_seconds)  # the bin still filling
        width = max(1, round(3.0 / self.bin_seconds))
        if current < 2 * width:
            return False
        recent = self._rate(current - width, current)
        before = self._rate(current - 2 * width, current - width)
        return abs(recent - before) <= self.tolerance * max(recent, before, 1e-9)

    async def clock(self) -> None:
        """Open the measured period when the warm-up is over."""
        await asyncio.sleep(self.warmup)
        give_up = self.t0 + self.warmup + self.settle
        while self.settle > 0:
            now = time.perf_counter()
            if self._stable(now):
                self.settled = True
                break
            if now >= give_up:
                self.settled = False
                break
            await asyncio.sleep(0.25)
        self.start = time.perf_counter()
        self.end = self.start + self.duration
        self.opened.set()

    def record(self, began: float, ended: float, steps: int) -> None:
        self.timeline[int((ended - self.t0) / self.bin_seconds)] += 1
        if self.start <= ended < self.end:
            self.latencies.append(ended - began)
            self.completed += 1
            self.timesteps += steps

    def error(self, ended: float, code: str) -> None:
        if self.start <= ended < self.end:
            self.errors[code] += 1
        else:
            self.warmup_errors[code] += 1

    def summary(self) -> dict[str, Any]:
        seconds = self.end - self.start
        lat = np.asarray(self.latencies) * 1e3

        def pct(q: float) -> float | None:
            return round(float(np.percentile(lat, q)), 3) if len(lat) else None

        bins = max(self.timeline) + 1 if self.timeline else 0
        first = int((self.start - self.t0) / self.bin_seconds)
        last = int((self.end - self.t0) / self.bin_seconds)
        measured = [self.timeline.get(i, 0) / self.bin_seconds for i in range(first + 1, last)]
        return {
            "measured_seconds": round(seconds, 3),
            "warmup_used_seconds": round(self.start - self.t0, 2),
            "settled": self.settled,
            "completed": self.completed,
            "requests_per_second": round(self.completed / seconds, 2),
            "timesteps_per_second": round(self.timesteps / seconds, 1),
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": round(float(lat.max()), 3) if len(lat) else None,
            # Spread of the per-interval throughput inside the measured period (stalls).
            "measured_rate_min_max": [round(min(measured), 1), round(max(measured), 1)]
            if measured
            else None,
            "errors": dict(self.errors),
            "warmup_errors": dict(self.warmup_errors),
            "timeline_bin_seconds": self.bin_seconds,
            "timeline_per_second": [
                round(self.timeline.get(i, 0) / self.bin_seconds, 1) for i in range(bins)
            ],
        }


def channels(target: str, count: int) -> list[grpc.aio.Channel]:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # Separate TCP connections per channel instead of one shared subchannel.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


async def connect(chans: Sequence[grpc.aio.Channel], timeout: float = 30.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in chans)), timeout)


def code_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    return type(exc).__name__


def batch_counts(metrics_port: int | None) -> tuple[float, float] | None:
    """The server's batches and rows so far (`rnnserve_batch_size` count and sum), if asked."""
    if metrics_port is None:
        return None
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals = {"rnnserve_batch_size_count": 0.0, "rnnserve_batch_size_sum": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["rnnserve_batch_size_count"], totals["rnnserve_batch_size_sum"]


async def finish(tasks: Sequence[asyncio.Task[Any]], grace: float) -> None:
    """Let workers end by themselves (they stop after the window), then cancel stragglers."""
    done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            progress(f"worker failed: {task.exception()!r}")


# ---- predict ----


async def run_predict(args: argparse.Namespace) -> dict[str, Any]:
    requests, steps = read_requests(Path(args.requests))
    order = np.random.default_rng(args.seed).permutation(len(requests)).tolist()
    chans = channels(args.target, max(1, min(args.channels, args.concurrency)))
    calls = [
        c.unary_unary(PREDICT, request_serializer=None, response_deserializer=None) for c in chans
    ]
    await connect(chans)
    cpu = CpuWatch(args.watch_pid)
    window = Window(args.warmup, args.duration, args.bin, args.settle, args.tolerance)
    next_index = 0
    response_bytes: list[int] = []

    async def worker(w: int) -> None:
        nonlocal next_index
        call = calls[w % len(calls)]
        while True:
            began = time.perf_counter()
            if began >= window.end:
                return
            k = order[next_index % len(order)]
            next_index += 1
            try:
                response = await call(requests[k], timeout=args.timeout)
            except Exception as exc:  # counted, whatever it is: a worker never dies silently
                window.error(time.perf_counter(), code_of(exc))
                await asyncio.sleep(0.01)
                continue
            ended = time.perf_counter()
            window.record(began, ended, steps[k])
            if len(response_bytes) < 64:
                response_bytes.append(len(response))

    async def watch_cpu() -> None:
        await window.opened.wait()
        cpu.start()
        await asyncio.sleep(max(window.end - time.perf_counter(), 0))
        result["cpu_cores"] = cpu.stop()

    result: dict[str, Any] = {}
    progress(
        f"predict c={args.concurrency} channels={len(chans)} warm-up {args.warmup}s "
        f"(settle up to {args.settle}s more) measure {args.duration}s on {args.target}"
    )
    clock = asyncio.create_task(window.clock())
    watcher = asyncio.create_task(watch_cpu())
    tasks = [asyncio.create_task(worker(w)) for w in range(args.concurrency)]
    await clock
    await finish(tasks, grace=window.end - time.perf_counter() + args.timeout + 1)
    await watcher
    for c in chans:
        await c.close()
    summary = window.summary()
    summary.update(result)
    summary.update(
        concurrency=args.concurrency,
        channels=len(chans),
        warmup_seconds=args.warmup,
        request_bytes_mean=round(float(np.mean([len(r) for r in requests])), 1),
        response_bytes_mean=round(float(np.mean(response_bytes)), 1) if response_bytes else None,
        timesteps_per_request_mean=round(float(np.mean(steps)), 2),
    )
    progress(
        f"c={args.concurrency}: {summary['requests_per_second']:.0f} req/s, "
        f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, errors {summary['errors']}"
    )
    return summary


# ---- first request ----


async def warm_client(request: bytes) -> None:
    """Run this process's own first calls (gRPC client setup, first RPC) against a throwaway
    in-process server, so that the timed first request measures the server under test."""

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    handler = grpc.method_handlers_generic_handler(
        "rnnserve.v1.Inference", {"Predict": grpc.unary_unary_rpc_method_handler(answer)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    [chan] = channels(f"127.0.0.1:{port}", 1)
    call = chan.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
    for _ in range(3):
        await call(request, timeout=10)
    await chan.close()
    await server.stop(None)


async def run_first(args: argparse.Namespace) -> dict[str, Any]:
    """The first request on a fresh connection, `count` sequential ones right after it (the
    steady state as a client sees it at once), then, after `pause` seconds of quiet (background
    compiles finish), `count` more (the settled state)."""
    requests, _steps = read_requests(Path(args.requests))
    if args.warm_client:
        await warm_client(requests[0])
    [chan] = channels(args.target, 1)
    call = chan.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
    started = time.perf_counter()
    await connect([chan])
    connect_ms = (time.perf_counter() - started) * 1e3

    async def timed(count: int, offset: int) -> list[float]:
        latencies = []
        for i in range(count):
            began = time.perf_counter()
            await call(requests[(offset + i) % len(requests)], timeout=args.timeout)
            latencies.append((time.perf_counter() - began) * 1e3)
        return latencies

    latencies = await timed(args.count + 1, 0)
    settled: list[float] = []
    if args.pause > 0:
        await asyncio.sleep(args.pause)
        settled = await timed(args.count, args.count + 1)
    after_quiet: list[float] = []
    for i in range(args.quiet_count if args.quiet_gap > 0 else 0):
        # The first request found a server that had been quiet since its warm-up, and a busy
        # client. The same for a warm server: this client spins (stays hot), the server idles.
        end = time.perf_counter() + args.quiet_gap
        while time.perf_counter() < end:
            pass
        after_quiet += await timed(1, 2 * args.count + 1 + i)
    await chan.close()
    first, rest = latencies[0], latencies[1:]
    result = {
        "connect_ms": round(connect_ms, 3),
        "first_ms": round(first, 3),
        "steady_p50_ms": round(float(np.median(rest)), 3),
        "steady_p99_ms": round(float(np.percentile(rest, 99)), 3),
        "count": len(rest),
        "first_ten_ms": [round(v, 3) for v in latencies[:10]],
        # The per-request trace shows when a background XLA compile finished.
        "trace_ms": [round(v, 3) for v in latencies],
    }
    if settled:
        result.update(
            pause_seconds=args.pause,
            settled_p50_ms=round(float(np.median(settled)), 3),
            settled_p99_ms=round(float(np.percentile(settled, 99)), 3),
        )
    if after_quiet:
        result.update(
            quiet_gap_seconds=args.quiet_gap,
            after_quiet_ms=[round(v, 3) for v in after_quiet],
            after_quiet_p50_ms=round(float(np.median(after_quiet)), 3),
        )
    return result


# ---- sessions ----


def stream_chunks(path: Path, steps: int) -> list[list[pb.Tensor]]:
    """Each test stream cut into consecutive chunks of exactly `steps` frames."""
    with np.load(path) as data:
        frames, offsets = data["frames"], data["offsets"]
    streams = []
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        series = frames[a:b]
        usable = len(series) - len(series) % steps
        streams.append([to_tensor(series[i : i + steps]) for i in range(0, usable, steps)])
    return [s for s in streams if s]


async def run_streams(args: argparse.Namespace) -> dict[str, Any]:
    chunks = stream_chunks(Path(args.chunks), args.chunk_steps)
    chans = channels(args.target, max(1, min(args.channels, args.sessions)))
    calls = [
        c.stream_stream(STREAM, request_serializer=None, response_deserializer=None) for c in chans
    ]
    await connect(chans)
    opening = pb.StreamRequest(open=pb.StreamOpen(model_name=args.model)).SerializeToString()
    closing = pb.StreamRequest(close=True).SerializeToString()
    cpu = CpuWatch(args.watch_pid)
    window = Window(args.warmup, args.duration, args.bin, args.settle, args.tolerance)
    gate = asyncio.Semaphore(args.open_concurrency)
    opened = 0
    closed = 0
    failed_sessions: collections.Counter[str] = collections.Counter()

    async def session(s: int) -> None:
        nonlocal opened, closed
        stream = chunks[s % len(chunks)]
        position = (s // len(chunks) * 7) % len(stream)
        offset = 0
        call = None
        try:
            async with gate:  # the call starts here: at most `open_concurrency` opening at once
                call = calls[s % len(calls)](timeout=args.warmup + args.duration + 120)
                await call.write(opening)
                if await call.read() is grpc.aio.EOF:
                    raise RuntimeError("stream ended before it opened")
            opened += 1
            while True:
                began = time.perf_counter()
                if began >= window.end:
                    break
                message = pb.StreamRequest(chunk=pb.Chunk(data=stream[position], offset=offset))
                await call.write(message.SerializeToString())
                answer = await call.read()
                ended = time.perf_counter()
                if answer is grpc.aio.EOF:
                    raise RuntimeError("stream ended")
                window.record(began, ended, args.chunk_steps)
                offset += args.chunk_steps
                position = (position + 1) % len(stream)
            await call.write(closing)
            await call.read()
            await call.done_writing()
            closed += 1
        except Exception as exc:  # counted by kind (a refused call raises InvalidStateError)
            failed_sessions[code_of(exc)] += 1
            window.error(time.perf_counter(), code_of(exc))
            if call is not None:
                call.cancel()

    async def watch_cpu() -> None:
        await window.opened.wait()
        progress(f"measuring: {opened} sessions open")
        result["sessions_open_at_start"] = opened - closed - sum(failed_sessions.values())
        cpu.start()
        batches = await asyncio.to_thread(batch_counts, args.metrics_port)
        await asyncio.sleep(max(window.end - time.perf_counter(), 0))
        result["cpu_cores"] = cpu.stop()
        result["sessions_open_at_end"] = opened - closed - sum(failed_sessions.values())
        ended = await asyncio.to_thread(batch_counts, args.metrics_port)
        if batches is not None and ended is not None:  # the server's batches in the window only
            result["window_batches"] = int(ended[0] - batches[0])
            result["window_rows"] = int(ended[1] - batches[1])

    result: dict[str, Any] = {}
    progress(
        f"streams: {args.sessions} sessions x {args.chunk_steps}-step chunks, "
        f"warm-up {args.warmup}s, measure {args.duration}s on {args.target}"
    )
    clock = asyncio.create_task(window.clock())
    watcher = asyncio.create_task(watch_cpu())
    tasks = [asyncio.create_task(session(s)) for s in range(args.sessions)]
    await clock
    await finish(tasks, grace=window.end - time.perf_counter() + 60)
    await watcher
    for c in chans:
        await c.close()
    summary = window.summary()
    summary.update(result)
    summary.update(
        sessions=args.sessions,
        sessions_opened=opened,
        sessions_closed=closed,
        failed_sessions=dict(failed_sessions),
        chunk_steps=args.chunk_steps,
        chunks_per_second=summary["requests_per_second"],
        channels=len(chans),
    )
    progress(
        f"{summary['chunks_per_second']:.0f} chunks/s, {summary['timesteps_per_second']:.0f} "
        f"steps/s, p99 {summary['p99_ms']} ms, failed {dict(failed_sessions)}"
    )
    return summary


async def run_idle_sessions(args: argparse.Namespace) -> dict[str, Any]:
    chunks = [c for stream in stream_chunks(Path(args.chunks), args.chunk_steps) for c in stream]
    chans = channels(args.target, max(1, args.channels))
    opens = [
        c.unary_unary(OPEN, request_serializer=None, response_deserializer=None) for c in chans
    ]
    steps = [
        c.unary_unary(STEP, request_serializer=None, response_deserializer=None) for c in chans
    ]
    await connect(chans)
    open_request = pb.OpenSessionRequest(model_name=args.model).SerializeToString()
    errors: collections.Counter[str] = collections.Counter()
    done = 0
    next_index = 0
    started = time.perf_counter()
    give_up = started + args.max_seconds

    async def worker(w: int) -> None:
        nonlocal done, next_index
        while next_index < args.sessions and time.perf_counter() < give_up:
            i = next_index
            next_index += 1
            try:
                info = pb.SessionInfo.FromString(await opens[w % len(chans)](open_request))
                step = pb.StepSessionRequest(
                    session_id=info.session_id,
                    chunk=pb.Chunk(data=chunks[i % len(chunks)], offset=0),
                    output_mode=pb.OUTPUT_MODE_SEQUENCE,
                )
                await steps[w % len(chans)](step.SerializeToString(), timeout=60)
            except grpc.aio.AioRpcError as exc:
                errors[code_of(exc)] += 1
                continue
            done += 1
            if done % 10_000 == 0:
                rate = done / (time.perf_counter() - started)
                progress(f"{done} sessions open and stepped ({rate:.0f}/s)")

    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    seconds = time.perf_counter() - started
    for c in chans:
        await c.close()
    return {
        "sessions": done,
        "asked": args.sessions,
        "seconds": round(seconds, 2),
        "sessions_per_second": round(done / seconds, 1),
        "errors": dict(errors),
        "concurrency": args.concurrency,
        "chunk_steps": args.chunk_steps,
    }


# ---- command line ----


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = root.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", required=True, help="host:port")
        p.add_argument("--channels", type=int, default=2, help="gRPC channels (TCP connections)")
        p.add_argument(
            "--watch-pid",
            type=int,
            action="append",
            default=[],
            help="also report this process's CPU use (repeatable)",
        )
        p.add_argument("--bin", type=float, default=1.0, help="timeline interval, seconds")

    def settle(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--settle",
            type=float,
            default=0.0,
            help="after the warm-up, go on warming up until throughput is stable, "
            "at most this many more seconds",
        )
        p.add_argument(
            "--tolerance",
            type=float,
            default=0.1,
            help="stable: the last 3 s within this fraction of the 3 s before",
        )

    p = sub.add_parser("predict", help="closed-loop Predict load")
    common(p)
    p.add_argument("--requests", required=True, help=".npz of serialized PredictRequests")
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    settle(p)

    p = sub.add_parser("first", help="first Predict on a fresh connection, then sequential ones")
    common(p)
    p.add_argument("--requests", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--pause", type=float, default=3.0, help="quiet seconds, then --count more")
    p.add_argument(
        "--no-warm-client",
        dest="warm_client",
        action="store_false",
        help="do not warm this client's gRPC stack on a throwaway local server first",
    )
    p.add_argument(
        "--quiet-gap",
        type=float,
        default=0.0,
        help="then --quiet-count single requests, each after this many seconds of server quiet",
    )
    p.add_argument("--quiet-count", type=int, default=10)
    p.add_argument("--timeout", type=float, default=120.0)

    p = sub.add_parser("streams", help="concurrent streaming sessions")
    common(p)
    p.add_argument("--metrics-port", type=int, help="the server's, for batches in the window")
    p.add_argument("--model", required=True)
    p.add_argument("--chunks", required=True, help=".npz of test streams (frames, offsets)")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--chunk-steps", type=int, default=10)
    p.add_argument("--open-concurrency", type=int, default=100)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=20.0)
    settle(p)

    p = sub.add_parser("idle-sessions", help="open N sessions, one step each, leave them open")
    common(p)
    p.add_argument("--model", required=True)
    p.add_argument("--chunks", required=True)
    p.add_argument("--sessions", type=int, default=100_000)
    p.add_argument("--chunk-steps", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--max-seconds", type=float, default=300.0)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runner = {
        "predict": run_predict,
        "first": run_first,
        "streams": run_streams,
        "idle-sessions": run_idle_sessions,
    }[args.mode]
    result = asyncio.run(runner(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
