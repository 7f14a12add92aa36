"""Predict throughput and latency, side by side, on the shipped `japanese_vowels` model.

Servers (each its own process on 127.0.0.1, measured one after another):

  (a) rnnserve      `rnnserve serve` on a repository holding only this model
  (b) naive         `model.predict(x[None])` per request
  (c) careful       rnnserve's compiled `Forward` (XLA) at batch 1, one call per request
  (e) echo          gRPC only: a prebuilt response of the same size (the transport limit)
  (f) frontdoor     diagnostic: rnnserve itself with its batcher answering from a cache of its
                    real answers by length (rnnserve's request path without batching or compute)

and (d) the compute limit: `Forward` on padded batches of 64 test sequences, in process.

Load: `benchmarks/loadgen.py` in its own process, closed loop, one sequence per `Predict`, drawn
from the model's real test split (same request bytes for every server), at each concurrency:
a warm-up period (at least --warmup seconds, longer until throughput is stable), then a measured
period. Before each level a server is primed with rounds of unmeasured load at that level until it
is idle when the load stops: rnnserve compiles an XLA program per shape bucket in the background
once the bucket was seen 3 times, and a level's batches fall into many buckets (rows 1..64 x
timesteps 8..32). Load generator and servers share the machine's cores.

    python benchmarks/bench_predict.py                       # ~4-5 minutes
    python benchmarks/bench_predict.py --duration 4 --warmup 2 --servers rnnserve echo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import PYTHON, Children, log

SERVERS = ("rnnserve", "rnnserve-cp", "careful", "naive", "echo", "frontdoor")
# (a'): rnnserve with its batches computed in a child process, and batches of at most half the
# 64 clients so that one computes while the event loop takes in the other half's requests.
CP_BATCHING = {"max_batch_size": 32}
LABELS = {
    "rnnserve": "(a) rnnserve",
    "rnnserve-cp": "(a') rnnserve --compute-process, max_batch_size 32",
    "naive": "(b) naive model.predict",
    "careful": "(c) careful unbatched (Forward, XLA, batch 1)",
    "echo": "(e) gRPC echo (transport limit)",
    "frontdoor": "(f) rnnserve front door only (answers cached: no batching, no compute)",
}
TARGETS = {"vs_limit": 0.70, "vs_careful": 4.0, "p50_gap_ms": 1.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="japanese_vowels", help="model name (and recipe)")
    p.add_argument(
        "--version-dir",
        type=Path,
        default=None,
        help="model version directory (default: models/<model>/1, the shipped one)",
    )
    p.add_argument(
        "--wait-for-model",
        type=float,
        default=0.0,
        help="seconds to wait for the model file to appear (being trained)",
    )
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per level")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    p.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="after the warm-up, keep warming up (at most this many more seconds per level) "
        "until throughput is stable: the last 3 s within --tolerance of the 3 s before",
    )
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument(
        "--prime",
        type=float,
        default=4.0,
        help="before each level: rounds of this many seconds of unmeasured load, until the "
        "server is idle once the load stops (no background compile left); 0: no priming",
    )
    p.add_argument("--prime-max", type=float, default=30.0, help="most priming seconds per level")
    p.add_argument("--channels", type=int, default=2, help="load generator gRPC connections")
    p.add_argument("--compute-seconds", type=float, default=8.0, help="(d) measured seconds")
    p.add_argument("--compute-batch", type=int, default=64)
    p.add_argument(
        "--rnnserve-arg",
        action="append",
        default=[],
        help="extra argument for `rnnserve serve` (repeatable), e.g. --no-xla",
    )
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and temp files")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="write predict.json/.md here instead of benchmarks/results (the CI smoke test)",
    )
    return p.parse_args(argv)


def start_server(
    kind: str, children: Children, args: argparse.Namespace, work: Path, lengths: list[int]
) -> tuple[Any, str, float]:
    port = common.free_port()
    target = f"{common.HOST}:{port}"
    baselines = str(common.HERE / "baselines.py")
    version_dir = args.version_dir
    if kind == "rnnserve":
        repo = common.make_repo(work / "repo", args.model, version_dir)
        argv = common.rnnserve_argv(repo, port, *args.rnnserve_arg)
    elif kind == "rnnserve-cp":
        repo = common.make_repo(work / "repo-cp", args.model, version_dir, CP_BATCHING)
        argv = common.rnnserve_argv(repo, port, "--compute-process", *args.rnnserve_arg)
    elif kind == "frontdoor":
        repo = common.make_repo(work / "repo-frontdoor", args.model, version_dir)
        _, *serve = common.rnnserve_argv(repo, port, *args.rnnserve_arg)
        argv = [PYTHON, baselines, "frontdoor", *serve]
    elif kind in ("naive", "careful"):
        argv = [
            PYTHON,
            baselines,
            kind,
            "--model-dir",
            str(version_dir),
            "--name",
            args.model,
            "--port",
            str(port),
            "--lengths",
            *map(str, sorted(set(lengths))),
        ]
    else:
        argv = [
            PYTHON,
            baselines,
            "echo",
            "--response",
            str(work / "response.bin"),
            "--port",
            str(port),
        ]
    started = time.perf_counter()
    proc = children.start(kind, argv)
    probe = (work / "probe.bin").read_bytes()
    common.wait_ready(target, proc, args.start_timeout, probe)
    return proc, target, time.perf_counter() - started


def load(
    target: str,
    requests: Path,
    concurrency: int,
    warmup: float,
    duration: float,
    pid: int,
    args: argparse.Namespace,
    log_path: Path,
    settle: float = 0.0,
) -> dict[str, Any]:
    argv = [
        PYTHON,
        str(common.HERE / "loadgen.py"),
        "predict",
        "--target",
        target,
        "--requests",
        str(requests),
        "-c",
        str(concurrency),
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
        "--channels",
        str(args.channels),
        "--watch-pid",
        str(pid),
        "--settle",
        str(settle),
        "--tolerance",
        str(args.tolerance),
    ]
    return common.run_json(argv, log_path, timeout=warmup + settle + duration + 120)


def idle_cores(pid: int, seconds: float = 1.5) -> float:
    """CPU the server uses with no load on it (a background XLA compile shows here)."""
    import psutil

    proc = psutil.Process(pid)
    time.sleep(0.3)  # the last answers leave
    before = sum(proc.cpu_times()[:2])
    time.sleep(seconds)
    return (sum(proc.cpu_times()[:2]) - before) / seconds


def prime(
    target: str, requests: Path, c: int, pid: int, args: argparse.Namespace, log_path: Path
) -> dict[str, Any]:
    """Unmeasured load at concurrency `c` in rounds, until the server has no background work
    left when the load stops (rnnserve compiles XLA buckets in the background)."""
    started = time.perf_counter()
    rounds = []
    while True:
        level = load(target, requests, c, 0.0, args.prime, pid, args, log_path)
        idle = idle_cores(pid)
        rounds.append({"requests_per_second": level["requests_per_second"], "idle_cores": idle})
        spent = time.perf_counter() - started
        if idle < 0.05 or spent >= args.prime_max:
            break
    log(
        f"primed at c={c} in {spent:.0f}s ({len(rounds)} rounds; server idle CPU after: "
        f"{idle:.2f} cores; req/s by round: "
        f"{[round(r['requests_per_second']) for r in rounds]})"
    )
    return {"seconds": round(spent, 1), "rounds": rounds, "idle": idle < 0.05}


def save_response(target: str, probe: bytes, path: Path) -> int:
    """rnnserve's answer to a typical request, for the echo server to send back."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/rnnserve.v1.Inference/Predict", request_serializer=None, response_deserializer=None
        )
        response = call(probe, timeout=30)
    path.write_bytes(response)
    return len(response)


def build_requests(work: Path, model: str) -> tuple[Path, list[int]]:
    from loadgen import predict_request, write_requests

    data = work / "test_split.npz"
    info = common.export_data(common.MODELS / model, data, work / "export.log")
    sequences = common.load_sequences(data)
    lengths = [len(s) for s in sequences]
    log(
        f"test split: {info['count']} sequences, lengths {info['min']}..{info['max']}, "
        f"mean {sum(lengths) / len(lengths):.1f}"
    )
    requests = [predict_request(model, s) for s in sequences]
    path = work / "requests.npz"
    write_requests(path, requests, lengths)
    # Probe: a sequence of the median length.
    median = sorted(range(len(lengths)), key=lambda i: lengths[i])[len(lengths) // 2]
    (work / "probe.bin").write_bytes(requests[median])
    return path, lengths


def run(args: argparse.Namespace, work: Path, children: Children) -> dict[str, Any]:
    requests, lengths = build_requests(work, args.model)
    results: dict[str, Any] = {"servers": {}}
    servers = [s for s in SERVERS if s in args.servers]
    if "echo" in servers and "rnnserve" not in servers:
        servers.insert(0, "rnnserve")  # the echo answer is rnnserve's own response
    for kind in servers:
        log(f"starting {LABELS[kind]}")
        proc, target, startup = start_server(kind, children, args, work, lengths)
        log(f"{kind} ready on {target} after {startup:.1f}s")
        if kind == "rnnserve":
            size = save_response(target, (work / "probe.bin").read_bytes(), work / "response.bin")
            log(f"rnnserve response to the probe: {size} bytes (echo sends these bytes back)")
        entry: dict[str, Any] = {
            "label": LABELS[kind],
            "startup_seconds": round(startup, 1),
            "levels": {},
        }
        if kind in args.servers:
            for c in args.concurrency:
                if args.prime > 0:
                    entry.setdefault("prime", {})[str(c)] = prime(
                        target, requests, c, proc.pid, args, work / f"loadgen-{kind}-prime.log"
                    )
                log(f"{kind}: c={c} warm-up {args.warmup:.0f}s + measure {args.duration:.0f}s")
                level = load(
                    target,
                    requests,
                    c,
                    args.warmup,
                    args.duration,
                    proc.pid,
                    args,
                    work / f"loadgen-{kind}.log",
                    settle=args.settle,
                )
                cpu = level.get("cpu_cores", {})
                log(
                    f"{kind} c={c} (warm-up {level['warmup_used_seconds']:.0f}s, settled "
                    f"{level['settled']}): {level['requests_per_second']:.0f} req/s, "
                    f"{level['timesteps_per_second']:.0f} steps/s, p50 {level['p50_ms']} ms, "
                    f"p99 {level['p99_ms']} ms; CPU cores: server "
                    f"{cpu.get(f'pid{proc.pid}', '?')} (busiest thread "
                    f"{cpu.get(f'pid{proc.pid}_busiest_thread', '?')}), "
                    f"loadgen {cpu.get('loadgen', '?')}, "
                    f"others {cpu.get('others', '?')}; errors {level['errors']}"
                )
                entry["levels"][str(c)] = level
            results["servers"][kind] = entry
        children.stop(proc)
        if kind == "rnnserve":
            entry["log_tail"] = common.tail(work / "rnnserve.log", 12).splitlines()
    log(
        f"(d) compute limit: Forward on batches of {args.compute_batch}, "
        f"{args.compute_seconds:.0f}s"
    )
    argv = [
        PYTHON,
        str(common.HERE / "baselines.py"),
        "compute",
        "--model-dir",
        str(args.version_dir),
        "--data",
        str(work / "test_split.npz"),
        "--batch",
        str(args.compute_batch),
        "--seconds",
        str(args.compute_seconds),
    ]
    try:
        results["compute_limit"] = common.run_json(argv, work / "compute.log", timeout=300)
        log(f"compute limit: {results['compute_limit']['sequences_per_second']:.0f} sequences/s")
    except RuntimeError as exc:  # keep the servers' figures
        results["compute_limit_error"] = str(exc)[-2000:]
        log(f"compute limit failed: {str(exc)[-600:]}")
    return results


def ratios(results: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    servers = results["servers"]
    top, low = str(max(levels)), str(min(levels))

    def rps(kind: str, c: str) -> float | None:
        level = servers.get(kind, {}).get("levels", {}).get(c)
        return None if level is None else float(level["requests_per_second"])

    out: dict[str, Any] = {"at_concurrency": int(top)}
    a, careful, echo = rps("rnnserve", top), rps("careful", top), rps("echo", top)
    compute = results.get("compute_limit", {}).get("sequences_per_second")
    limits = [v for v in (compute, echo) if v]
    if a and limits:
        out["limit"] = min(limits)
        out["limit_is"] = "transport (echo)" if echo and min(limits) == echo else "compute"
        out["rnnserve_vs_limit"] = round(a / min(limits), 3)
    if a and careful:
        out["rnnserve_vs_careful"] = round(a / careful, 2)
    front = rps("frontdoor", top)
    if front and a:
        out["rnnserve_vs_frontdoor"] = round(a / front, 3)
    if front and echo:
        out["frontdoor_vs_echo"] = round(front / echo, 3)
    a1 = servers.get("rnnserve", {}).get("levels", {}).get(low)
    c1 = servers.get("careful", {}).get("levels", {}).get(low)
    if a1 and c1:
        out["p50_gap_ms_at_concurrency"] = int(low)
        out["p50_gap_ms"] = round(a1["p50_ms"] - c1["p50_ms"], 3)
    cp, cp1 = rps("rnnserve-cp", top), servers.get("rnnserve-cp", {}).get("levels", {}).get(low)
    if cp:
        out["compute_process"] = {
            "vs_limit": round(cp / min(limits), 3) if limits else None,
            "vs_careful": round(cp / careful, 2) if careful else None,
            "p50_gap_ms": round(cp1["p50_ms"] - c1["p50_ms"], 3) if cp1 and c1 else None,
        }
    out["targets"] = TARGETS
    out["met"] = {
        "vs_limit": out.get("rnnserve_vs_limit", 0) >= TARGETS["vs_limit"],
        "vs_careful": out.get("rnnserve_vs_careful", 0) >= TARGETS["vs_careful"],
        "p50_gap_ms": out.get("p50_gap_ms", 1e9) <= TARGETS["p50_gap_ms"],
    }
    return out


def _warmups(payload: dict[str, Any]) -> str:
    """The warm-ups the levels took, as a range of seconds."""
    used = [
        level["warmup_used_seconds"]
        for entry in payload["results"]["servers"].values()
        for level in entry["levels"].values()
        if "warmup_used_seconds" in level
    ]
    return f"{min(used):.1f}-{max(used):.1f}s" if used else "?"


def markdown(payload: dict[str, Any]) -> str:
    m, r = payload["machine"], payload["ratios"]
    lines = [
        f"### Predict: `{payload['model']}` ({payload['model_source']})\n",
        f"{m['date']}, {m['cores']} cores ({m['cpu']}), Python {m['python']}, TensorFlow "
        f"{m['tensorflow']}, Keras {m['keras']}, grpcio {m['grpcio']}. Load generator and "
        f"server share the {m['cores']} cores. Test split: {payload['sequences']} sequences of "
        f"{payload['length_min']}..{payload['length_max']} steps (mean "
        f"{payload['length_mean']:.1f}); one sequence per request; warm-up "
        f"{_warmups(payload)} (at least {payload['settings']['warmup']:g}s, on until stable) + "
        f"measured {payload['settings']['duration']:g}s per level.\n",
    ]
    lines.append(common.provenance(payload))
    rows = []
    for _kind, entry in payload["results"]["servers"].items():
        for c, level in entry["levels"].items():
            cpu = level.get("cpu_cores", {})
            server_cpu, busiest = common.server_cpu(cpu)
            rows.append(
                [
                    entry["label"],
                    c,
                    level["requests_per_second"],
                    level["timesteps_per_second"],
                    level["p50_ms"],
                    level["p99_ms"],
                    server_cpu,
                    busiest,
                    cpu.get("loadgen", ""),
                    cpu.get("others", ""),
                    sum(level["errors"].values()),
                ]
            )
    cl = payload["results"].get("compute_limit")
    if cl:
        rows.append(
            [
                f"(d) compute limit (Forward, batch {cl['batch']}, XLA, in process)",
                "-",
                cl["sequences_per_second"],
                cl["timesteps_per_second"],
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                0,
            ]
        )
    lines.append(
        common.md_table(
            [
                "server",
                "concurrency",
                "requests/s",
                "timesteps/s",
                "p50 ms",
                "p99 ms",
                "server CPU (cores)",
                "its busiest thread",
                "loadgen CPU",
                "other CPU",
                "errors",
            ],
            rows,
        )
    )
    lines.append("")
    t = r["targets"]

    def verdict(key: str) -> str:
        return "met" if r["met"][key] else "**not met**"

    if "rnnserve_vs_limit" in r:
        lines.append(
            f"- rnnserve / min(compute limit, transport limit) at concurrency "
            f"{r['at_concurrency']}: **{r['rnnserve_vs_limit']:.2f}** (limit = "
            f"{r['limit']:,.0f}/s, {r['limit_is']}; target >= {t['vs_limit']}: "
            f"{verdict('vs_limit')})"
        )
    if "rnnserve_vs_careful" in r:
        lines.append(
            f"- rnnserve / careful unbatched at concurrency {r['at_concurrency']}: "
            f"**{r['rnnserve_vs_careful']:.2f}x** (target >= {t['vs_careful']:g}x: "
            f"{verdict('vs_careful')})"
        )
    if "p50_gap_ms" in r:
        lines.append(
            f"- p50 at concurrency {r['p50_gap_ms_at_concurrency']}, rnnserve minus "
            f"careful: **{r['p50_gap_ms']:+.3f} ms** (target <= {t['p50_gap_ms']:g} ms: "
            f"{verdict('p50_gap_ms')})"
        )
    cp = r.get("compute_process")
    if cp:
        said = []
        for key, text, fmt, good in [
            ("vs_limit", "of min(compute, transport)", "{:.2f}", lambda v: v >= t["vs_limit"]),
            ("vs_careful", "x careful", "{:.2f}", lambda v: v >= t["vs_careful"]),
            (
                "p50_gap_ms",
                "ms p50 gap at the lowest concurrency",
                "{:+.3f}",
                lambda v: v <= t["p50_gap_ms"],
            ),
        ]:
            if cp.get(key) is not None:
                mark = "met" if good(cp[key]) else "**not met**"
                said.append(f"**{fmt.format(cp[key])}** {text} ({mark})")
        lines.append(f"- (a') with `--compute-process`, batches of at most 32: {'; '.join(said)}")
    if "rnnserve_vs_frontdoor" in r:
        lines.append(
            f"- rnnserve / its own front door with answers cached, at concurrency "
            f"{r['at_concurrency']}: **{r['rnnserve_vs_frontdoor']:.2f}** (the rest of the "
            "distance is what batching and the model cost)"
        )
    if "frontdoor_vs_echo" in r:
        lines.append(
            f"- front door with answers cached / echo at concurrency {r['at_concurrency']}: "
            f"**{r['frontdoor_vs_echo']:.2f}** (rnnserve's request path on top of gRPC, with no "
            "batching and no compute: about a ceiling for (a), not for (a'))"
        )
    if payload.get("disturbance"):
        lines.append(f"- other processes busy at start: {'; '.join(payload['disturbance'])}")
    return "\n".join(lines) + "\n"


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
    log(f"model {args.model}: {source}; servers {args.servers}; concurrency {args.concurrency}")
    log("note: the load generator and the servers share this machine's cores")
    started = time.perf_counter()
    machine, disturbance = common.survey()
    with common.workdir(args.keep_workdir) as work, Children(work) as children:
        log(f"work dir {work}")
        try:
            results = run(args, work, children)
        except BaseException:
            for path in sorted(work.glob("*.log")):
                print(f"--- {path.name}\n{common.tail(path, 15)}", file=sys.stderr)
            raise
        data = common.load_sequences(work / "test_split.npz")
    lengths = [len(s) for s in data]
    payload = {
        "benchmark": "predict",
        "model": args.model,
        "model_source": source,
        "model_path": str(args.version_dir / "model.keras"),
        "model_mtime": common.model_mtime(args.version_dir),
        "sequences": len(lengths),
        "length_min": min(lengths),
        "length_max": max(lengths),
        "length_mean": sum(lengths) / len(lengths),
        "machine": machine,
        "disturbance": disturbance,
        "settings": {
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "duration": args.duration,
            "prime": args.prime,
            "channels": args.channels,
            "rnnserve_args": args.rnnserve_arg,
        },
        "results": results,
        "ratios": ratios(results, args.concurrency),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(["python", "benchmarks/bench_predict.py", *(argv or sys.argv[1:])]),
    }
    common.publish(
        "predict", payload, markdown(payload), write=not args.no_write, directory=args.results_dir
    )
    log(f"done in {payload['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
