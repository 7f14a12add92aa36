"""Soak: `japanese_vowels` at 10x its sustainable rate, then at half of it (bounded, ~4 minutes).

1. `rnnserve serve` on a repository holding only the shipped model, with a small queue
   (`--max-queue 256`, also written into the model's `config.json` batching keys, which override
   the flag) so that overload is refused rather than queued; metrics on a free port.
2. The sustainable rate S (sequences/s): closed loop, one real test sequence per request,
   concurrency 32 (`loadgen.py predict`), measured 8 s after a warm-up.
3. Overload (60 s): an open-loop load process (`soak.py --load`) fires requests on a fixed
   schedule whatever the answers, 10 sequences per request at factor x S / 10 requests/s (one
   Python process cannot send 10 x S single-sequence requests/s), each with a deadline and no
   retries. Every request's outcome is counted by status code; requests with no answer at all by
   the end of the phase + deadline + a drain period are LOST/HUNG (must be 0). Refusals
   (RESOURCE_EXHAUSTED) are timed and checked for a `retry-after-ms` trailer.
4. Normal load (30 s): open loop at 0.5 x S, one sequence per request: OK share, latency, and the
   throughput achieved against the offered rate.
5. Server RSS before the overload, at its end and after the normal phase (a sampler also records
   RSS and queue depth every second); `rnnserve_queue_depth` at the end (must be 0) and
   `rnnserve_requests_total` by code, cross-checked against the client's counts per phase.

    python benchmarks/soak.py                                  # ~3.5 minutes
    python benchmarks/soak.py --overload-seconds 10 --normal-seconds 5 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import numpy as np
from common import PYTHON, Children, log

MODEL = "japanese_vowels"
PREDICT = "/rnnserve.v1.Inference/Predict"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overload-seconds", type=float, default=60.0)
    p.add_argument("--normal-seconds", type=float, default=30.0)
    p.add_argument("--factor", type=float, default=10.0, help="overload: offered = factor x S")
    p.add_argument("--normal-factor", type=float, default=0.5, help="normal: offered = this x S")
    p.add_argument("--deadline", type=float, default=2.0, help="per-request deadline, seconds")
    p.add_argument("--max-queue", type=int, default=256, help="server queue, sequences")
    p.add_argument(
        "--per-request", type=int, default=10, help="overload: sequences per Predict request"
    )
    p.add_argument(
        "--normal-per-request", type=int, default=1, help="normal: sequences per Predict request"
    )
    p.add_argument(
        "--drain", type=float, default=5.0, help="after each phase + deadline: wait for answers"
    )
    p.add_argument("--concurrency", type=int, default=32, help="S: closed-loop concurrency")
    p.add_argument("--measure-warmup", type=float, default=3.0, help="S: warm-up seconds")
    p.add_argument("--measure-settle", type=float, default=7.0, help="S: extra warm-up, at most")
    p.add_argument("--measure-seconds", type=float, default=8.0, help="S: measured seconds")
    p.add_argument("--channels", type=int, default=2, help="load generator connections")
    p.add_argument("--quiet", type=float, default=3.0, help="idle seconds before an RSS reading")
    p.add_argument(
        "--refusal-p99-target-ms",
        type=float,
        default=100.0,
        help="refusals count as fast when their p99 is at most this",
    )
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


# ---- the open-loop load process (`soak.py --load ...`) ----


def parse_load_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="open-loop Predict load (soak.py's own load process)")
    p.add_argument("--target", required=True)
    p.add_argument("--requests", required=True, help=".npz of serialized PredictRequests")
    p.add_argument("--rate", type=float, required=True, help="requests per second offered")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--per-request", type=int, required=True, help="sequences per request")
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--drain", type=float, required=True)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--watch-pid", type=int, action="append", default=[])
    p.add_argument("--out", required=True, help="JSON result file")
    return p.parse_args(argv)


def percentiles(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
    }


async def run_open(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from loadgen import MAX_MESSAGE, CpuWatch, connect, progress, read_requests

    requests, _steps = read_requests(Path(args.requests))
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),
        # No transparent retries: every refusal must reach the counts below.
        ("grpc.enable_retries", 0),
    ]
    chans = [grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.channels)]
    stubs = [
        c.unary_unary(PREDICT, request_serializer=None, response_deserializer=None) for c in chans
    ]
    await connect(chans)
    cpu = CpuWatch(args.watch_pid)

    total = int(args.rate * args.seconds)
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    hints_ms: list[float] = []
    # A few distinct status messages per code (what actually said no, and why).
    details: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    debug: dict[str, list[str]] = collections.defaultdict(list)  # gRPC's own error strings
    missing_hint = 0
    late = 0  # answered after deadline + 0.5 s: the client's own deadline should prevent this
    # Requests in flight (sent, not answered) when each answer came, by code: where in the
    # backlog the transport started to cancel calls.
    in_flight: dict[str, list[int]] = collections.defaultdict(list)
    most_in_flight = 0
    pending: dict[int, asyncio.Task[None]] = {}
    lags = np.zeros(total)
    sent_per_s: collections.Counter[int] = collections.Counter()
    done_per_s: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    t0 = time.perf_counter() + 0.05

    async def outcome(i: int, call: Any, began: float) -> None:
        nonlocal missing_hint, late
        try:
            await call
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            text = (exc.details() or "")[:160]
            if text in details[code] or len(details[code]) < 5:
                details[code][text] += 1
            if len(debug[code]) < 3:
                debug[code].append(str(exc.debug_error_string())[:300])
            if code == "RESOURCE_EXHAUSTED":
                hint = [v for k, v in (exc.trailing_metadata() or ()) if k == "retry-after-ms"]
                if hint:
                    hints_ms.append(float(hint[0]))
                else:
                    missing_hint += 1
        except asyncio.CancelledError:
            raise  # only lost calls are cancelled, after the drain: counted there
        except Exception as exc:  # anything else is an answer of sorts; name it
            code = type(exc).__name__
        ended = time.perf_counter()
        in_flight[code].append(len(pending))
        latencies[code].append(ended - began)
        late += ended - began > args.deadline + 0.5
        done_per_s[code][int(ended - t0)] += 1
        del pending[i]

    progress(
        f"open loop: {args.rate:.1f} requests/s x {args.per_request} sequences for "
        f"{args.seconds:.0f}s, deadline {args.deadline}s, on {args.target}"
    )
    await asyncio.sleep(max(t0 - time.perf_counter(), 0))
    wall_start = time.time()
    cpu.start()
    end = t0 + args.seconds
    sent = 0
    # Fire request i at t0 + i / rate, whatever has come back. If this process falls behind it
    # catches up in bursts (the offered schedule is kept); the lag is reported. Nothing is sent
    # after the phase ends, so `sent` / seconds is the rate actually offered.
    while sent < total:
        now = time.perf_counter()
        if now >= end:
            break
        due = min(total, int((now - t0) * args.rate) + 1)
        while sent < due:
            began = time.perf_counter()
            lags[sent] = began - (t0 + sent / args.rate)
            call = stubs[sent % len(stubs)](requests[sent % len(requests)], timeout=args.deadline)
            pending[sent] = asyncio.create_task(outcome(sent, call, began))
            sent_per_s[int(began - t0)] += 1
            sent += 1
        most_in_flight = max(most_in_flight, len(pending))
        await asyncio.sleep(max(t0 + sent / args.rate - time.perf_counter(), 0))
    send_end = time.perf_counter()
    wall_send_end = time.time()
    cpu_cores = cpu.stop()
    in_flight_at_end = len(pending)
    # Every call carries the deadline, so all should be answered by then; wait a drain period
    # more, and whatever is still without an answer is lost or hung.
    if pending:
        await asyncio.wait(list(pending.values()), timeout=args.deadline + args.drain)
    lost = len(pending)
    for task in list(pending.values()):
        task.cancel()
    if pending:
        await asyncio.wait(list(pending.values()), timeout=5)
    for c in chans:
        await c.close()

    counts = {code: len(v) for code, v in sorted(latencies.items())}
    send_seconds = send_end - t0
    ok = counts.get("OK", 0)
    bins = int(max(send_seconds, 1)) + int(args.deadline + args.drain) + 1
    result = {
        "offered_requests_per_second": args.rate,
        "sequences_per_request": args.per_request,
        "offered_sequences_per_second": round(args.rate * args.per_request, 1),
        "seconds": args.seconds,
        "scheduled": total,
        "sent": sent,
        "sent_requests_per_second": round(sent / send_seconds, 2),
        "sent_sequences_per_second": round(sent * args.per_request / send_seconds, 1),
        "send_lag_ms": percentiles(lags[:sent].tolist()),
        "deadline_seconds": args.deadline,
        "drain_seconds": args.drain,
        "in_flight_at_phase_end": in_flight_at_end,
        "in_flight_max": most_in_flight,
        "in_flight_at_answer": {
            code: {
                "min": int(min(v)),
                "p50": int(np.median(v)),
                "max": int(max(v)),
            }
            for code, v in sorted(in_flight.items())
        },
        "answered": sum(counts.values()),
        "counts": counts,
        "lost": lost,
        "late": int(late),
        "latency": {code: percentiles(v) for code, v in sorted(latencies.items())},
        "details": {code: dict(c.most_common()) for code, c in sorted(details.items())},
        "debug_error_strings": dict(sorted(debug.items())),
        "ok_fraction": round(ok / sent, 4) if sent else None,
        # OK answers to this phase's requests per second of the phase (answers of the last
        # requests arrive just after it).
        "ok_sequences_per_second": round(ok * args.per_request / send_seconds, 1),
        "retry_after": {
            "with_hint": len(hints_ms),
            "missing_hint": missing_hint,
            "hint_ms_min": min(hints_ms) if hints_ms else None,
            "hint_ms_p50": float(np.median(hints_ms)) if hints_ms else None,
            "hint_ms_max": max(hints_ms) if hints_ms else None,
        },
        "cpu_cores": cpu_cores,
        "wall_start": wall_start,
        "wall_send_end": wall_send_end,
        "timeline_sent_per_second": [sent_per_s.get(s, 0) for s in range(bins)],
        "timeline_answers_per_second": {
            code: [c.get(s, 0) for s in range(bins)] for code, c in sorted(done_per_s.items())
        },
    }
    progress(
        f"sent {sent} of {total} ({result['sent_requests_per_second']} req/s), answers "
        f"{counts}, lost {lost}, refusal hints {len(hints_ms)} (missing {missing_hint})"
    )
    return result


def load_main(argv: Sequence[str]) -> int:
    args = parse_load_args(argv)
    result = asyncio.run(run_open(args))
    Path(args.out).write_text(json.dumps(result) + "\n")
    return 0


# ---- the server side: RSS, queue depth, request counters ----


def server_metrics(port: int) -> dict[str, Any]:
    """Queue depth and `rnnserve_requests_total` of Predict on MODEL, by code (common.scrape
    sums over labels, and the code is a label here)."""
    with urllib.request.urlopen(f"http://{common.HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    by_code: dict[str, int] = {}
    depth = 0.0
    for line in text.splitlines():
        match = re.match(
            r"^(rnnserve_requests_total|rnnserve_queue_depth)\{([^}]*)\}\s+(\S+)$", line
        )
        if not match:
            continue
        name, raw_labels, value = match.groups()
        labels = dict(re.findall(r'(\w+)="([^"]*)"', raw_labels))
        if labels.get("model") != MODEL:
            continue
        if name == "rnnserve_queue_depth":
            depth += float(value)
        elif labels.get("method") == "Predict":
            code = labels.get("code", "?")
            by_code[code] = by_code.get(code, 0) + round(float(value))
    return {"queue_depth": int(depth), "requests_by_code": by_code}


def memory(pid: int) -> dict[str, int]:
    import psutil

    info = psutil.Process(pid).memory_info()
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    anon = next((int(x.split()[1]) * 1024 for x in status if x.startswith("RssAnon:")), 0)
    return {"rss": int(info.rss), "rss_anon": anon}


class Sampler:
    """Every `interval` seconds: the server's RSS, RssAnon, CPU and queue depth, on a thread (the
    driver only waits for the load process meanwhile)."""

    def __init__(self, pid: int, metrics_port: int, interval: float = 1.0) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.pid, self.metrics_port, self.interval = pid, metrics_port, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.proc.cpu_percent(None)
        while not self._stop.wait(self.interval):
            try:
                sample: dict[str, Any] = {"t": time.time(), **memory(self.pid)}
                sample["cpu_cores"] = round(self.proc.cpu_percent(None) / 100, 2)
                sample["queue_depth"] = server_metrics(self.metrics_port)["queue_depth"]
            except Exception as exc:  # a failed sample must not end the soak; note it
                sample = {"t": time.time(), "error": repr(exc)}
            self.samples.append(sample)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- the driver ----


def build_requests(work: Path, per_request: Sequence[int]) -> tuple[dict[int, Path], bytes]:
    """Request files of `k` real test sequences per request for each k; and a probe."""
    from loadgen import predict_request, write_requests

    from rnnserve.client.tensors import to_tensor
    from rnnserve.v1 import inference_pb2 as pb

    data = work / "test_split.npz"
    info = common.export_data(common.MODELS / MODEL, data, work / "export.log")
    sequences = common.load_sequences(data)
    lengths = [len(s) for s in sequences]
    log(
        f"test split: {info['count']} sequences, lengths {info['min']}..{info['max']}, "
        f"mean {sum(lengths) / len(lengths):.1f}"
    )
    rng = np.random.default_rng(0)
    paths = {}
    for k in sorted(set(per_request)):
        # Ten seeded shuffles of the split, cut into groups of k: varied lengths per request.
        order = np.concatenate([rng.permutation(len(sequences)) for _ in range(10)]).tolist()
        groups = [order[i : i + k] for i in range(0, len(order) - k + 1, k)]
        requests = [
            pb.PredictRequest(
                model_name=MODEL, sequences=[to_tensor(sequences[j]) for j in group]
            ).SerializeToString()
            for group in groups
        ]
        paths[k] = work / f"requests-{k}.npz"
        write_requests(paths[k], requests, [sum(lengths[j] for j in g) for g in groups])
    median = sorted(range(len(lengths)), key=lambda i: lengths[i])[len(lengths) // 2]
    return paths, predict_request(MODEL, sequences[median])


def start_server(children: Children, work: Path, args: argparse.Namespace) -> tuple[Any, str, int]:
    version_dir = common.model_version_dir(MODEL)
    # The model's config.json batching keys override the command line: put max_queue there too.
    repo = common.make_repo(work / "repo", MODEL, version_dir, {"max_queue": args.max_queue})
    port, metrics_port = common.free_port(), common.free_port()
    argv = common.rnnserve_argv(repo, port, "--max-queue", str(args.max_queue))
    argv[argv.index("--metrics-port") + 1] = str(metrics_port)
    proc = children.start("rnnserve", argv)
    target = f"{common.HOST}:{port}"
    return proc, target, metrics_port


def sustainable_rate(
    target: str, pid: int, requests: Path, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    argv = [
        PYTHON,
        str(common.HERE / "loadgen.py"),
        "predict",
        "--target",
        target,
        "--requests",
        str(requests),
        "--concurrency",
        str(args.concurrency),
        "--channels",
        str(args.channels),
        "--warmup",
        str(args.measure_warmup),
        "--settle",
        str(args.measure_settle),
        "--duration",
        str(args.measure_seconds),
        "--watch-pid",
        str(pid),
    ]
    timeout = args.measure_warmup + args.measure_settle + args.measure_seconds + 120
    return common.run_json(argv, work / "loadgen-measure.log", timeout=timeout)


def open_phase(
    name: str,
    children: Children,
    server: Any,
    target: str,
    metrics_port: int,
    requests: Path,
    rate: float,
    seconds: float,
    per_request: int,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    out = work / f"{name}.json"
    argv = [
        PYTHON,
        str(Path(__file__).resolve()),
        "--load",
        "--target",
        target,
        "--requests",
        str(requests),
        "--rate",
        f"{rate:.3f}",
        "--seconds",
        str(seconds),
        "--per-request",
        str(per_request),
        "--deadline",
        str(args.deadline),
        "--drain",
        str(args.drain),
        "--channels",
        str(args.channels),
        "--watch-pid",
        str(server.pid),
        "--out",
        str(out),
    ]
    before = server_metrics(metrics_port)
    with Sampler(server.pid, metrics_port) as sampler:
        load = children.start(f"load-{name}", argv)
        limit = seconds + args.deadline + args.drain + 60
        try:
            load.wait(limit)
        except Exception:
            log(f"{name}: load process still running after {limit:.0f}s; stopping it")
            raise
        finally:
            children.stop(load)
    if load.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"{name} load exited {load.returncode}; see {load.log_path}:\n"
            + common.tail(load.log_path)
        )
    result: dict[str, Any] = json.loads(out.read_text())
    after = server_metrics(metrics_port)
    codes = set(before["requests_by_code"]) | set(after["requests_by_code"])
    result["server_requests_by_code"] = {
        c: after["requests_by_code"].get(c, 0) - before["requests_by_code"].get(c, 0)
        for c in sorted(codes)
        if after["requests_by_code"].get(c, 0) != before["requests_by_code"].get(c, 0)
    }
    result["queue_depth_after_drain"] = after["queue_depth"]
    result["server_samples"] = sampler.samples
    good = [s for s in sampler.samples if "rss" in s]
    at_end = [s for s in good if s["t"] <= result["wall_send_end"]]
    result["server_at_phase_end"] = at_end[-1] if at_end else None
    result["server_max"] = {
        "rss": max((s["rss"] for s in good), default=None),
        "rss_anon": max((s["rss_anon"] for s in good), default=None),
        "queue_depth": max((s["queue_depth"] for s in good), default=None),
        "cpu_cores": max((s["cpu_cores"] for s in good), default=None),
    }
    counts = result["counts"]
    log(
        f"{name}: sent {result['sent']} of {result['scheduled']} requests "
        f"({result['sent_requests_per_second']:.0f}/s offered {rate:.0f}/s; send lag p99 "
        f"{result['send_lag_ms']['p99_ms']} ms); answers {counts}; lost {result['lost']}; "
        f"server counted {result['server_requests_by_code']}; OK "
        f"{result['ok_sequences_per_second']:.0f} sequences/s; queue depth max "
        f"{result['server_max']['queue_depth']}, after drain {after['queue_depth']}"
    )
    return result


def quiet_memory(pid: int, seconds: float) -> dict[str, int]:
    time.sleep(seconds)  # let in-flight work and allocator activity settle
    return memory(pid)


def run(args: argparse.Namespace, work: Path, children: Children) -> dict[str, Any]:
    paths, probe = build_requests(work, [1, args.per_request, args.normal_per_request])
    proc, target, metrics_port = start_server(children, work, args)
    ready = common.wait_ready(target, proc, args.start_timeout, probe)
    log(f"rnnserve ready on {target} after {ready:.1f}s (metrics :{metrics_port})")

    log(
        f"sustainable rate: closed loop, c={args.concurrency}, one sequence per request, "
        f"warm-up >= {args.measure_warmup:.0f}s, measure {args.measure_seconds:.0f}s"
    )
    measured = sustainable_rate(target, proc.pid, paths[1], args, work)
    s = float(measured["requests_per_second"])
    log(
        f"S = {s:.0f} sequences/s (p50 {measured['p50_ms']} ms, p99 {measured['p99_ms']} ms, "
        f"errors {measured['errors']})"
    )
    if s <= 0:
        raise RuntimeError("no sustainable rate measured")

    rss_before = quiet_memory(proc.pid, args.quiet)
    queue_before = server_metrics(metrics_port)["queue_depth"]
    log(f"RSS before overload: {rss_before['rss'] / 2**20:.1f} MiB")

    over_rate = args.factor * s / args.per_request
    log(
        f"overload: {args.factor:g} x S = {args.factor * s:.0f} sequences/s offered as "
        f"{over_rate:.0f} requests/s x {args.per_request}, {args.overload_seconds:.0f}s"
    )
    overload = open_phase(
        "overload",
        children,
        proc,
        target,
        metrics_port,
        paths[args.per_request],
        over_rate,
        args.overload_seconds,
        args.per_request,
        args,
        work,
    )
    rss_after_drain = memory(proc.pid)

    normal_rate = args.normal_factor * s / args.normal_per_request
    log(
        f"normal: {args.normal_factor:g} x S = {args.normal_factor * s:.0f} sequences/s as "
        f"{normal_rate:.0f} requests/s x {args.normal_per_request}, {args.normal_seconds:.0f}s"
    )
    normal = open_phase(
        "normal",
        children,
        proc,
        target,
        metrics_port,
        paths[args.normal_per_request],
        normal_rate,
        args.normal_seconds,
        args.normal_per_request,
        args,
        work,
    )
    rss_after = quiet_memory(proc.pid, args.quiet)
    final = server_metrics(metrics_port)
    alive = proc.poll() is None
    code = children.stop(proc)
    log_text = Path(proc.log_path).read_text(errors="replace")
    log(
        f"RSS after: {rss_after['rss'] / 2**20:.1f} MiB; queue depth at end "
        f"{final['queue_depth']}; server exited {code} on SIGTERM"
    )
    end_of_overload = overload["server_at_phase_end"] or {}
    return {
        "server_pid": proc.pid,
        "sustainable": measured,
        "sustainable_sequences_per_second": s,
        "overload": overload,
        "normal": normal,
        "server": {
            "ready_seconds": round(ready, 1),
            "rss_before_overload": rss_before,
            "rss_end_of_overload": {
                k: end_of_overload.get(k) for k in ("rss", "rss_anon", "queue_depth")
            },
            "rss_after_overload_drain": rss_after_drain,
            "rss_after_normal": rss_after,
            "queue_depth_before": queue_before,
            "queue_depth_at_end": final["queue_depth"],
            "requests_by_code_total": final["requests_by_code"],
            "alive_at_end": alive,
            "exit_code_on_sigterm": code,
            "log_lines": log_text.count("\n"),
            "log_bytes": len(log_text.encode()),
            "log_tracebacks": log_text.count("Traceback"),
        },
    }


def phase_row(name: str, r: dict[str, Any], server_pid: int) -> list[Any]:
    c = r["counts"]
    named = ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED")
    other = sum(v for k, v in c.items() if k not in named)
    ok_lat = r["latency"].get("OK", {})
    refused = r["latency"].get("RESOURCE_EXHAUSTED", {})
    cpu = r.get("cpu_cores", {})
    return [
        name,
        f"{r['offered_sequences_per_second']:,.0f} ({r['offered_requests_per_second']:,.0f} x "
        f"{r['sequences_per_request']})",
        f"{r['sent']:,} ({r['sent_requests_per_second']:,.0f}/s)",
        r["send_lag_ms"]["p99_ms"],
        *(f"{c.get(k, 0):,}" for k in named),
        f"{other:,}",
        r["lost"],
        r["ok_sequences_per_second"],
        f"{ok_lat.get('p50_ms', '-')} / {ok_lat.get('p99_ms', '-')}",
        f"{refused.get('p50_ms', '-')} / {refused.get('p99_ms', '-')}" if refused else "-",
        cpu.get(f"pid{server_pid}", ""),
        cpu.get("loadgen", ""),
        cpu.get("others", ""),
    ]


def markdown(payload: dict[str, Any]) -> str:
    m, res, srv = payload["machine"], payload["results"], payload["results"]["server"]
    over, normal, args = res["overload"], res["normal"], payload["settings"]
    s = res["sustainable_sequences_per_second"]
    mib = 2**20
    lines = [
        f"### Soak: `{MODEL}` (shipped), {args['factor']:g}x overload then "
        f"{args['normal_factor']:g}x\n",
        f"{m['date']}, {m['cores']} cores ({m['cpu']}), Python {m['python']}, TensorFlow "
        f"{m['tensorflow']}, Keras {m['keras']}, grpcio {m['grpcio']}. Load generator and server "
        f"share the {m['cores']} cores.\n",
        common.provenance(payload),
        f"Server: `--max-queue {args['max_queue']}` (sequences), metrics on. Sustainable rate "
        f"**S = {s:,.0f} sequences/s** (closed loop, c={args['concurrency']}, one sequence per "
        f"request, p50 {res['sustainable']['p50_ms']} ms, p99 {res['sustainable']['p99_ms']} ms). "
        f"Open loop: requests fired on a fixed schedule whatever the answers, deadline "
        f"{args['deadline']:g}s, no retries; overload {args['overload_seconds']:.0f}s, normal "
        f"{args['normal_seconds']:.0f}s; answers waited for up to deadline + "
        f"{args['drain']:g}s after each phase.\n",
    ]
    lines.append(
        common.md_table(
            [
                "phase",
                "offered seq/s (req/s x seq)",
                "requests sent",
                "send lag p99 ms",
                "OK",
                "RESOURCE_EXHAUSTED",
                "DEADLINE_EXCEEDED",
                "CANCELLED",
                "other",
                "lost/hung",
                "OK seq/s",
                "OK p50 / p99 ms",
                "refusal p50 / p99 ms",
                "server CPU",
                "loadgen CPU",
                "other CPU",
            ],
            [
                phase_row("overload", over, res["server_pid"]),
                phase_row("normal", normal, res["server_pid"]),
            ],
        )
    )
    lines.append("\nServer counters (`rnnserve_requests_total`, Predict) against the client:\n")
    rows = []
    for name, r in (("overload", over), ("normal", normal)):
        codes = sorted(set(r["counts"]) | set(r["server_requests_by_code"]))
        client = ", ".join(f"{k} {r['counts'].get(k, 0):,}" for k in codes)
        server = ", ".join(f"{k} {r['server_requests_by_code'].get(k, 0):,}" for k in codes)
        client_total = sum(r["counts"].values())
        server_total = sum(r["server_requests_by_code"].values())
        unseen = client_total - server_total
        rows.append([name, client, f"{client_total:,}", server, f"{server_total:,}", f"{unseen:,}"])
    lines.append(
        common.md_table(
            [
                "phase",
                "client",
                "client total",
                "server",
                "server total",
                "never reached rnnserve's handler",
            ],
            rows,
        )
    )
    end = srv["rss_end_of_overload"]
    lines.append("\nServer memory and queue:\n")
    lines.append(
        common.md_table(
            ["when", "RSS MiB", "RssAnon MiB", "queue depth"],
            [
                [
                    "before overload (after S, quiet)",
                    srv["rss_before_overload"]["rss"] / mib,
                    srv["rss_before_overload"]["rss_anon"] / mib,
                    srv["queue_depth_before"],
                ],
                [
                    "end of overload (last sample)",
                    end["rss"] / mib if end.get("rss") else "-",
                    end["rss_anon"] / mib if end.get("rss_anon") else "-",
                    end.get("queue_depth", "-"),
                ],
                [
                    "overload: max of 1 s samples",
                    over["server_max"]["rss"] / mib,
                    over["server_max"]["rss_anon"] / mib,
                    over["server_max"]["queue_depth"],
                ],
                [
                    "after normal phase (quiet)",
                    srv["rss_after_normal"]["rss"] / mib,
                    srv["rss_after_normal"]["rss_anon"] / mib,
                    srv["queue_depth_at_end"],
                ],
            ],
        )
    )
    checks = payload["checks"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    hints = over["retry_after"]
    refused = over["counts"].get("RESOURCE_EXHAUSTED", 0)
    lines.append(
        f"\n- lost/hung (no answer by the end of the phase + deadline + drain): overload "
        f"**{over['lost']}**, normal **{normal['lost']}** (target 0: "
        f"{verdict(checks['no_lost'])}); answered later than deadline + 0.5 s: "
        f"{over['late'] + normal['late']}"
    )
    refusal_p99 = over["latency"].get("RESOURCE_EXHAUSTED", {}).get("p99_ms")
    lines.append(
        f"- refusals: {refused:,} RESOURCE_EXHAUSTED, p99 {refusal_p99} ms (target <= "
        f"{args['refusal_p99_target_ms']:g} ms: {verdict(checks['fast_refusals'])}); "
        f"`retry-after-ms` on {hints['with_hint']:,} of them (missing on "
        f"{hints['missing_hint']}: {verdict(checks['hints'])}), hint "
        f"{hints['hint_ms_min']}..{hints['hint_ms_max']} ms (median {hints['hint_ms_p50']})"
    )
    cancelled = over["counts"].get("CANCELLED", 0)
    unseen = sum(over["counts"].values()) - sum(over["server_requests_by_code"].values())
    at = over["in_flight_at_answer"].get("CANCELLED")
    lines.append(
        f"- overload backlog: up to {over['in_flight_max']:,} requests in flight at the client "
        f"({over['in_flight_at_phase_end']:,} at the end of the phase); {unseen:,} requests never "
        f"reached rnnserve's handler (not in its counters)"
        + (
            f"; {cancelled:,} CANCELLED answers, p50 "
            f"{over['latency']['CANCELLED']['p50_ms']} ms, while {at['min']:,}..{at['max']:,} "
            f"(median {at['p50']:,}) requests were in flight"
            if cancelled and at
            else ""
        )
    )
    lines.append(
        f"- overload offered {over['offered_sequences_per_second']:,.0f} sequences/s, sent "
        f"{over['sent_sequences_per_second']:,.0f}/s ({over['sent']:,} of {over['scheduled']:,} "
        f"scheduled requests; send lag p50 {over['send_lag_ms']['p50_ms']} ms); served OK "
        f"{over['ok_sequences_per_second']:,.0f} sequences/s = "
        f"{over['ok_sequences_per_second'] / s:.2f} x S"
    )
    lines.append(
        f"- normal: offered {normal['offered_sequences_per_second']:,.0f} sequences/s, served "
        f"OK {normal['ok_sequences_per_second']:,.0f}/s "
        f"({normal['ok_sequences_per_second'] / normal['offered_sequences_per_second']:.3f} of "
        f"offered), OK share {normal['ok_fraction']} (target 1.0: "
        f"{verdict(checks['normal_all_ok'])})"
    )
    growth = (srv["rss_after_normal"]["rss"] - srv["rss_before_overload"]["rss"]) / mib
    anon = (srv["rss_after_normal"]["rss_anon"] - srv["rss_before_overload"]["rss_anon"]) / mib
    lines.append(
        f"- RSS after - before: {growth:+.1f} MiB (RssAnon {anon:+.1f} MiB); queue depth at end "
        f"**{srv['queue_depth_at_end']}** (target 0: {verdict(checks['queue_empty'])}); server "
        f"alive at end: {srv['alive_at_end']}, exit code on SIGTERM {srv['exit_code_on_sigterm']}"
    )
    lines.append(
        f"- server log: {srv['log_lines']:,} lines ({srv['log_bytes'] / mib:.1f} MiB; non-OK "
        f"requests, at most one line a second per method, model and status), tracebacks: "
        f"{srv['log_tracebacks']}"
    )
    if payload.get("disturbance"):
        lines.append(f"- other processes busy at start: {'; '.join(payload['disturbance'])}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--load"]:
        return load_main(argv[1:])
    args = parse_args(argv)
    common.install_signal_handlers()
    version_dir = common.model_version_dir(MODEL)
    if not common.model_ready(version_dir):
        log(f"no model at {version_dir}; train it with models/{MODEL}/recipe.py")
        return 2
    log("note: the load generator and the server share this machine's cores")
    started = time.perf_counter()
    machine, disturbance = common.survey()
    payload: dict[str, Any] = {
        "benchmark": "soak",
        "model": MODEL,
        "model_path": str(version_dir / "model.keras"),
        "model_mtime": common.model_mtime(version_dir),
        "machine": machine,
        "disturbance": disturbance,
        "settings": vars(args),
    }
    with common.workdir(args.keep_workdir) as work, Children(work) as children:
        log(f"work dir {work}")
        try:
            payload["results"] = run(args, work, children)
        except BaseException:
            for path in sorted(work.glob("*.log")):
                print(f"--- {path.name}\n{common.tail(path, 15)}", file=sys.stderr)
            raise
    res = payload["results"]
    over, normal, srv = res["overload"], res["normal"], res["server"]
    refusal_p99 = over["latency"].get("RESOURCE_EXHAUSTED", {}).get("p99_ms")
    payload["checks"] = {
        "no_lost": over["lost"] == 0 and normal["lost"] == 0,
        "fast_refusals": refusal_p99 is not None and refusal_p99 <= args.refusal_p99_target_ms,
        "hints": over["retry_after"]["missing_hint"] == 0 and over["retry_after"]["with_hint"] > 0,
        "queue_empty": srv["queue_depth_at_end"] == 0,
        "normal_all_ok": normal["ok_fraction"] == 1.0,
    }
    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    payload["command"] = " ".join(["python", "benchmarks/soak.py", *argv])
    common.publish("soak", payload, markdown(payload), write=not args.no_write)
    log(f"done in {payload['wall_seconds']:.0f}s; checks {payload['checks']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
