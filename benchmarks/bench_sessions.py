"""Streaming sessions on the shipped `vowels_stream` model: cross-session batching and memory.

(a) Throughput: S concurrent sessions (default 1,000), each a `Stream` RPC sending 10-step chunks
    of real frames from the model's test streams, one chunk at a time, from a separate load
    process (`loadgen.py streams`), for a bounded time: timesteps/s and chunk latency p50/p99.
    Run twice: rnnserve as shipped (chunks of many sessions share a batch), and the same server
    with batches of one row (`--max-batch-size 1` and, because a model's `config.json` batching
    keys override that flag, the model's config copied with `max_batch_size: 1`): one chunk per
    model call. Prints the ratio.
(b) Memory: a fresh server, N idle sessions (default 100,000) opened with unary `OpenSession`
    plus one `StepSession` each (`loadgen.py idle-sessions`, bounded concurrency); the server's
    RSS (psutil) before and after, per session, against the raw state bytes per session (sum of
    the state sizes in `GetModelMetadata` x 4 bytes).

    python benchmarks/bench_sessions.py                 # ~5-6 minutes
    python benchmarks/bench_sessions.py --skip-memory --sessions 200 --duration 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import PYTHON, Children, log

TARGET_RATIO = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vowels_stream")
    p.add_argument(
        "--version-dir",
        type=Path,
        default=None,
        help="model version directory (default: models/<model>/1, the shipped one)",
    )
    p.add_argument("--wait-for-model", type=float, default=0.0)
    p.add_argument("--sessions", type=int, default=1000, help="(a) concurrent sessions")
    p.add_argument("--chunk-steps", type=int, default=10)
    p.add_argument("--warmup", type=float, default=10.0, help="(a) warm-up seconds (minimum)")
    p.add_argument(
        "--settle", type=float, default=20.0, help="(a) extra warm-up until throughput is stable"
    )
    p.add_argument("--duration", type=float, default=20.0, help="(a) measured seconds")
    p.add_argument("--channels", type=int, default=4, help="load generator connections")
    p.add_argument("--idle-sessions", type=int, default=100_000, help="(b) sessions to open")
    p.add_argument("--idle-concurrency", type=int, default=128)
    p.add_argument("--idle-warmup", type=int, default=2000, help="(b) sessions before 'before'")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def start_rnnserve(
    children: Children,
    name: str,
    repo: Path,
    args: argparse.Namespace,
    *extra: str,
) -> tuple[Any, str, int]:
    port, metrics_port = common.free_port(), common.free_port()
    argv = common.rnnserve_argv(repo, port, *extra)
    argv[argv.index("--metrics-port") + 1] = str(metrics_port)  # to read batch sizes back
    proc = children.start(name, argv)
    target = f"{common.HOST}:{port}"
    common.wait_port(target, proc, args.start_timeout)
    return proc, target, metrics_port


def metadata(target: str, model: str) -> dict[str, Any]:
    import grpc

    from rnnserve.v1 import inference_pb2 as pb
    from rnnserve.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.InferenceStub(channel).GetModelMetadata(
            pb.GetModelMetadataRequest(model_name=model), timeout=30
        )
    sizes = [int(s) for state in info.states for s in state.sizes]
    return {
        "can_stream": info.can_stream,
        "states": [{"layer": s.layer, "sizes": list(s.sizes)} for s in info.states],
        "state_floats": sum(sizes),
        "raw_state_bytes": 4 * sum(sizes),
    }


def batch_stats(metrics_port: int) -> dict[str, Any]:
    m = common.scrape(metrics_port)
    batches = m.get("rnnserve_batch_size_count", 0.0)
    rows = m.get("rnnserve_batch_size_sum", 0.0)
    compute = m.get("rnnserve_batch_compute_seconds_sum", 0.0)
    real = m.get("rnnserve_real_timesteps_total", 0.0)
    padded = m.get("rnnserve_padded_timesteps_total", 0.0)
    return {
        "batches": int(batches),
        "rows_per_batch": round(rows / batches, 2) if batches else None,
        "compute_seconds_total": round(compute, 2),
        "compute_ms_per_batch": round(compute / batches * 1e3, 3) if batches else None,
        "padding_efficiency": round(real / padded, 3) if padded else None,
        "sessions_active": int(m.get("rnnserve_sessions_active", 0)),
        "session_ends": {
            k.split("[")[1].rstrip("]"): int(v)
            for k, v in m.items()
            if k.startswith("rnnserve_session_ends_total[")
        },
    }


def streams_load(
    target: str, pid: int, metrics_port: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    argv = [
        PYTHON,
        str(common.HERE / "loadgen.py"),
        "streams",
        "--target",
        target,
        "--model",
        args.model,
        "--chunks",
        str(work / "streams.npz"),
        "--sessions",
        str(args.sessions),
        "--chunk-steps",
        str(args.chunk_steps),
        "--warmup",
        str(args.warmup),
        "--settle",
        str(args.settle),
        "--duration",
        str(args.duration),
        "--channels",
        str(args.channels),
        "--watch-pid",
        str(pid),
        "--metrics-port",
        str(metrics_port),
    ]
    timeout = args.warmup + args.settle + args.duration + 180
    return common.run_json(argv, work / "loadgen-streams.log", timeout=timeout)


def throughput(args: argparse.Namespace, work: Path, children: Children) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    variants = [
        ("batched", "as shipped: chunks of many sessions share a batch", None, ()),
        (
            "one_per_call",
            "max_batch_size 1: one chunk per model call",
            {"max_batch_size": 1},
            ("--max-batch-size", "1"),
        ),
    ]
    for key, label, batching, flags in variants:
        repo = common.make_repo(work / f"repo-{key}", args.model, args.version_dir, batching)
        log(f"(a) {key}: starting rnnserve ({label})")
        proc, target, metrics_port = start_rnnserve(children, f"rnnserve-{key}", repo, args, *flags)
        before = batch_stats(metrics_port)
        log(
            f"(a) {key}: {args.sessions} sessions x {args.chunk_steps}-step chunks, warm-up "
            f">= {args.warmup:.0f}s, measure {args.duration:.0f}s"
        )
        result = streams_load(target, proc.pid, metrics_port, args, work)
        after = batch_stats(metrics_port)
        result["server"] = after
        result["server"]["batches_during_run"] = after["batches"] - before["batches"]
        # Rows per batch of the measured window (the totals above include warm-up and ramp-up).
        batches = result.get("window_batches") or 0
        after["rows_per_batch"] = round(result["window_rows"] / batches, 2) if batches else None
        result["label"] = label
        result["max_batch_size"] = 1 if batching else shipped_batch_size(args.version_dir)
        cpu = result.get("cpu_cores", {})
        log(
            f"(a) {key}: {result['timesteps_per_second']:.0f} timesteps/s "
            f"({result['chunks_per_second']:.0f} chunks/s), p50 {result['p50_ms']} ms, p99 "
            f"{result['p99_ms']} ms, {after['rows_per_batch']} rows/batch; CPU cores: server "
            f"{cpu.get(f'pid{proc.pid}', '?')}, loadgen {cpu.get('loadgen', '?')}, others "
            f"{cpu.get('others', '?')}; failed sessions {result['failed_sessions']}"
        )
        children.stop(proc)
        runs[key] = result
    a, b = runs["batched"], runs["one_per_call"]
    ratio = (
        a["timesteps_per_second"] / b["timesteps_per_second"] if b["timesteps_per_second"] else 0
    )
    return {"runs": runs, "ratio": round(ratio, 2), "target": TARGET_RATIO}


def shipped_batch_size(version_dir: Path) -> Any:
    import json

    config = json.loads((version_dir / "config.json").read_text())
    return config.get("batching", {}).get("max_batch_size", "server default")


def idle_load(
    target: str, count: int, args: argparse.Namespace, work: Path, name: str
) -> dict[str, Any]:
    argv = [
        PYTHON,
        str(common.HERE / "loadgen.py"),
        "idle-sessions",
        "--target",
        target,
        "--model",
        args.model,
        "--chunks",
        str(work / "streams.npz"),
        "--sessions",
        str(count),
        "--chunk-steps",
        str(args.chunk_steps),
        "--concurrency",
        str(args.idle_concurrency),
        "--channels",
        "2",
        "--max-seconds",
        "360",
    ]
    return common.run_json(argv, work / f"loadgen-{name}.log", timeout=420)


def memory(args: argparse.Namespace, work: Path, children: Children) -> dict[str, Any]:
    import psutil

    repo = common.make_repo(work / "repo-memory", args.model, args.version_dir)
    capacity = args.idle_sessions + args.idle_warmup + 10_000
    log("(b) starting a fresh rnnserve")
    proc, target, metrics_port = start_rnnserve(
        children,
        "rnnserve-memory",
        repo,
        args,
        "--max-sessions",
        str(capacity),
        "--session-ttl",
        "3600",
    )
    meta = metadata(target, args.model)
    server = psutil.Process(proc.pid)

    def rss() -> dict[str, int]:
        time.sleep(3.0)  # let in-flight work and allocator activity settle
        info = server.memory_full_info()
        # RssAnon: private memory (heap) only. RSS also moves with file-backed pages (shared
        # libraries) that the kernel maps in or drops under memory pressure.
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        anon = next(int(x.split()[1]) * 1024 for x in status if x.startswith("RssAnon:"))
        return {"rss": int(info.rss), "uss": int(info.uss), "rss_anon": anon}

    started_rss = rss()
    log(f"(b) warm-up: {args.idle_warmup} sessions (compiles, allocator pools)")
    warm = idle_load(target, args.idle_warmup, args, work, "idle-warmup")
    before = rss()
    log(
        f"(b) RSS before: {before['rss'] / 2**20:.1f} MiB; opening {args.idle_sessions} "
        "sessions (OpenSession + one StepSession each)"
    )
    load = idle_load(target, args.idle_sessions, args, work, "idle")
    after = rss()
    stats = batch_stats(metrics_port)
    children.stop(proc)
    opened = load["sessions"]
    growth = after["rss"] - before["rss"]
    per_session = growth / opened if opened else 0.0
    raw = meta["raw_state_bytes"]
    allowed = 2 * raw + 1024
    log(
        f"(b) RSS after: {after['rss'] / 2**20:.1f} MiB; +{growth / 2**20:.1f} MiB for "
        f"{opened} sessions = {per_session:.0f} B/session (RssAnon "
        f"{(after['rss_anon'] - before['rss_anon']) / max(opened, 1):.0f} B/session; raw state "
        f"{raw} B; target <= {allowed} B)"
    )
    return {
        "metadata": meta,
        "sessions_opened": opened,
        "open_load": load,
        "warmup_load": warm,
        "rss_at_start": started_rss,
        "rss_before": before,
        "rss_after": after,
        "rss_growth_bytes": growth,
        "uss_growth_bytes": after["uss"] - before["uss"],
        "bytes_per_session": round(per_session, 1),
        "uss_bytes_per_session": round((after["uss"] - before["uss"]) / opened, 1)
        if opened
        else None,
        "anon_bytes_per_session": round((after["rss_anon"] - before["rss_anon"]) / opened, 1)
        if opened
        else None,
        "raw_state_bytes_per_session": raw,
        "target_bytes_per_session": allowed,
        "met": per_session <= allowed,
        "met_anon": opened > 0 and (after["rss_anon"] - before["rss_anon"]) / opened <= allowed,
        "server_after": stats,
    }


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"### Sessions: `{payload['model']}` ({payload['model_source']})\n",
        f"{m['date']}, {m['cores']} cores ({m['cpu']}), Python {m['python']}, TensorFlow "
        f"{m['tensorflow']}, Keras {m['keras']}, grpcio {m['grpcio']}. Load generator and "
        f"server share the {m['cores']} cores.\n",
    ]
    lines.append(common.provenance(payload))
    t = payload.get("throughput")
    if t:
        a = t["runs"]["batched"]
        lines.append(
            f"**(a) {a['sessions']} concurrent sessions** ({a['sessions_opened']} opened, "
            f"{a.get('sessions_open_at_start', '?')} open when the measurement began), `Stream` "
            f"RPCs, {a['chunk_steps']}-step "
            f"chunks of real frames, one chunk in flight per session; measured "
            f"{a['measured_seconds']:.0f}s after a {a['warmup_used_seconds']:.0f}s warm-up.\n"
        )
        rows = []
        for key, r in t["runs"].items():
            cpu = r.get("cpu_cores", {})
            server_cpu, _ = common.server_cpu(cpu)
            rows.append(
                [
                    f"{key} ({r['label']})",
                    r["max_batch_size"],
                    r["timesteps_per_second"],
                    r["chunks_per_second"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["server"]["rows_per_batch"],
                    server_cpu,
                    cpu.get("loadgen", ""),
                    cpu.get("others", ""),
                    sum(r["errors"].values()),  # failed sessions in the window are among them
                ]
            )
        lines.append(
            common.md_table(
                [
                    "server",
                    "max batch",
                    "timesteps/s",
                    "chunks/s",
                    "p50 ms",
                    "p99 ms",
                    "rows/batch",
                    "server CPU",
                    "loadgen CPU",
                    "other CPU",
                    "errors",
                ],
                rows,
            )
        )
        verdict = "met" if t["ratio"] >= t["target"] else "**not met**"
        lines.append(
            f"\n- batched / one chunk per call: **{t['ratio']:.2f}x** timesteps/s "
            f"(target >= {t['target']:g}x: {verdict})\n"
        )
    mem = payload.get("memory")
    if mem:
        verdict = "met" if mem["met"] else "**not met**"
        lines.append(
            f"**(b) {mem['sessions_opened']:,} idle sessions** (unary `OpenSession` + one "
            f"`StepSession` each, {mem['open_load']['concurrency']} in flight, "
            f"{mem['open_load']['seconds']:.0f}s) on a fresh server:\n"
        )
        lines.append(
            common.md_table(
                ["", "RSS MiB", "RssAnon MiB", "USS MiB"],
                [
                    [
                        f"before (after a warm-up of {mem['warmup_load']['sessions']} sessions)",
                        *(mem["rss_before"][k] / 2**20 for k in ("rss", "rss_anon", "uss")),
                    ],
                    ["after", *(mem["rss_after"][k] / 2**20 for k in ("rss", "rss_anon", "uss"))],
                ],
            )
        )
        anon_verdict = "met" if mem["met_anon"] else "**not met**"
        lines.append(
            f"\n- RSS growth per session: **{mem['bytes_per_session']:,.0f} B** ({verdict}); "
            f"RssAnon (private memory, steadier than RSS) "
            f"**{mem['anon_bytes_per_session']:,.0f} B** ({anon_verdict}); USS "
            f"{mem['uss_bytes_per_session']:,.0f} B"
        )
        lines.append(
            f"- raw state {mem['raw_state_bytes_per_session']} B/session "
            f"({mem['metadata']['state_floats']} floats: "
            + ", ".join(f"{s['layer']} {s['sizes']}" for s in mem["metadata"]["states"])
            + f"); target <= 2 x raw + 1 KB = {mem['target_bytes_per_session']} B"
        )
        lines.append(
            f"- sessions held by the server at the end: "
            f"{mem['server_after']['sessions_active']:,}, ended: "
            f"{mem['server_after']['session_ends'] or 'none'}\n"
        )
    if payload.get("disturbance"):
        lines.append(f"- other processes busy at start: {'; '.join(payload['disturbance'])}\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_signal_handlers()
    shipped = common.model_version_dir(args.model)
    args.version_dir = (args.version_dir or shipped).resolve()
    if not common.model_ready(args.version_dir) and args.wait_for_model > 0:
        common.wait_for_model(args.version_dir, args.wait_for_model)
    if not common.model_ready(args.version_dir):
        log(
            f"no model at {args.version_dir} (model.keras + config.json); train it first or pass "
            "--version-dir with a stand-in"
        )
        return 2
    source = "shipped" if args.version_dir == shipped.resolve() else f"stand-in {args.version_dir}"
    log(f"model {args.model}: {source}")
    log("note: the load generator and the server share this machine's cores")
    started = time.perf_counter()
    machine, disturbance = common.survey()
    payload: dict[str, Any] = {
        "benchmark": "sessions",
        "model": args.model,
        "model_source": source,
        "model_path": str(args.version_dir / "model.keras"),
        "model_mtime": common.model_mtime(args.version_dir),
        "machine": machine,
        "disturbance": disturbance,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with common.workdir(args.keep_workdir) as work, Children(work) as children:
        log(f"work dir {work}")
        try:
            info = common.export_data(
                common.MODELS / args.model, work / "streams.npz", work / "export.log"
            )
            log(f"test streams: {info['count']} of {info['min']}..{info['max']} frames")
            if not args.skip_throughput:
                payload["throughput"] = throughput(args, work, children)
            if not args.skip_memory:
                payload["memory"] = memory(args, work, children)
        except BaseException:
            for path in sorted(work.glob("*.log")):
                print(f"--- {path.name}\n{common.tail(path, 15)}", file=sys.stderr)
            raise
    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    payload["command"] = " ".join(
        ["python", "benchmarks/bench_sessions.py", *(argv or sys.argv[1:])]
    )
    common.publish("sessions", payload, markdown(payload), write=not args.no_write)
    log(f"done in {payload['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
