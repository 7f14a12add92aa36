"""First request after a model is loaded vs the steady state, on the shipped `japanese_vowels`.

For each length L: start a fresh rnnserve (a repository holding only the model), connect (the
HTTP/2 connection is made before timing), time the very first `Predict` of one sequence of length
L, then `--count` sequential requests of the same shape (real test sequences of that length) and
take their p50. Target: first <= 2 x steady p50. Then, after `--pause` seconds of quiet (rnnserve
compiles the XLA program of a bucket in the background after it was seen 3 times), `--count` more:
the settled p50. Last, `--quiet-count` single requests, each after `--quiet-gap` seconds in which
the (now fully warm) server was idle: the first request also arrives after the server has been quiet
since it loaded, and on this kind of machine any request after a quiet second is slower than one of
a back-to-back series (caches and idle CPUs; the bare echo server shows it too). First / after-quiet
says whether the first request still pays for anything a warm server does not. For reference all of
it is measured on the careful (batch-1 XLA, all compiled up front) and echo baselines of
`bench_predict.py`. The client is `loadgen.py first`, its own process.

    python benchmarks/bench_warmup.py                    # ~6 minutes
    python benchmarks/bench_warmup.py --lengths 9 15 26 --count 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from common import PYTHON, Children, log

TARGET = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="japanese_vowels")
    p.add_argument(
        "--version-dir",
        type=Path,
        default=None,
        help="model version directory (default: models/<model>/1, the shipped one)",
    )
    p.add_argument("--wait-for-model", type=float, default=0.0)
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths, one fresh server each (default: shortest, median and longest "
        "of the test split)",
    )
    p.add_argument("--count", type=int, default=200, help="sequential requests after the first")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="fresh servers per case (the first request is one "
        "sample per server; medians are reported)",
    )
    p.add_argument(
        "--pause", type=float, default=3.0, help="quiet seconds before --count settled requests"
    )
    p.add_argument(
        "--quiet-gap",
        type=float,
        default=1.0,
        help="seconds of server quiet before each after-quiet request (0: skip them)",
    )
    p.add_argument("--quiet-count", type=int, default=10, help="after-quiet requests per server")
    p.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="skip the same measurement on the careful and echo baselines",
    )
    p.add_argument("--rnnserve-arg", action="append", default=[], help="extra `serve` argument")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def requests_of_length(
    sequences: list[np.ndarray], length: int, model: str, path: Path
) -> tuple[Path, int]:
    from loadgen import predict_request, write_requests

    same = [s for s in sequences if len(s) == length]
    real = len(same)
    if not same:  # no test sequence of that length: cut longer ones (still real frames)
        same = [s[:length] for s in sequences if len(s) > length][:50]
    if not same:
        raise SystemExit(f"no test sequence is {length} steps or longer")
    write_requests(path, [predict_request(model, s) for s in same], [length] * len(same))
    return path, real


def first_requests(
    target: str, path: Path, args: argparse.Namespace, log_path: Path
) -> dict[str, Any]:
    argv = [
        PYTHON,
        str(common.HERE / "loadgen.py"),
        "first",
        "--target",
        target,
        "--requests",
        str(path),
        "--count",
        str(args.count),
        "--pause",
        str(args.pause),
        "--quiet-gap",
        str(args.quiet_gap),
        "--quiet-count",
        str(args.quiet_count),
    ]
    return common.run_json(argv, log_path, timeout=300)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the fresh servers of one case; every run's first request kept."""

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(float(np.median(values)), 3) if values else None

    out: dict[str, Any] = {
        "runs": len(runs),
        "first_ms": median("first_ms"),
        "first_ms_each": [r["first_ms"] for r in runs],
        "steady_p50_ms": median("steady_p50_ms"),
        "steady_p99_ms": median("steady_p99_ms"),
        "settled_p50_ms": median("settled_p50_ms"),
        "after_quiet_p50_ms": median("after_quiet_p50_ms"),
        "after_quiet_ms_each": [r.get("after_quiet_ms") for r in runs],
        "connect_ms": median("connect_ms"),
        "first_ten_ms": runs[0]["first_ten_ms"],
        "trace_ms": runs[0]["trace_ms"],
    }
    out["ratio"] = round(out["first_ms"] / out["steady_p50_ms"], 2)
    settled = out["settled_p50_ms"]
    out["ratio_settled"] = round(out["first_ms"] / settled, 2) if settled else None
    quiet = out["after_quiet_p50_ms"]
    out["ratio_quiet"] = round(out["first_ms"] / quiet, 2) if quiet else None
    out["met"] = out["ratio"] <= TARGET
    return out


def run(args: argparse.Namespace, work: Path, children: Children) -> dict[str, Any]:
    data = work / "test_split.npz"
    common.export_data(common.MODELS / args.model, data, work / "export.log")
    sequences = common.load_sequences(data)
    lengths = sorted(len(s) for s in sequences)
    if not args.lengths:
        args.lengths = sorted({lengths[0], lengths[len(lengths) // 2], lengths[-1]})
    response = work / "response.bin"
    baselines = str(common.HERE / "baselines.py")

    def measure(kind: str, length: int, path: Path) -> list[dict[str, Any]]:
        runs = []
        for rep in range(args.repeats):
            port = common.free_port()
            target = f"{common.HOST}:{port}"
            if kind == "rnnserve":
                repo = common.make_repo(work / f"repo-{length}-{rep}", args.model, args.version_dir)
                argv = common.rnnserve_argv(repo, port, *args.rnnserve_arg)
            elif kind == "echo":
                argv = [PYTHON, baselines, "echo", "--response", str(response), "--port", str(port)]
            else:
                argv = [PYTHON, baselines, "careful", "--model-dir", str(args.version_dir)]
                argv += ["--name", args.model, "--port", str(port), "--lengths"]
                argv += [str(n) for n in sorted(set(lengths))]
            started = time.perf_counter()
            proc = children.start(f"{kind}-{length}-{rep}", argv)
            common.wait_port(target, proc, args.start_timeout)  # models load before the port
            startup = time.perf_counter() - started
            result = first_requests(target, path, args, work / f"loadgen-{kind}-{length}.log")
            if not response.exists():
                save_response(target, path, response)
            children.stop(proc)
            result["server_start_seconds"] = round(startup, 1)
            runs.append(result)
        return runs

    rows = []
    for length in args.lengths:
        path, real = requests_of_length(sequences, length, args.model, work / f"req-{length}.npz")
        result = aggregate(measure("rnnserve", length, path))
        result.update(length=length, real_sequences_of_length=real)
        log(
            f"length {length}: first {result['first_ms']:.2f} ms (median of "
            f"{result['first_ms_each']}), next {args.count}: p50 {result['steady_p50_ms']:.2f} ms "
            f"-> {result['ratio']:.2f}x; after {args.pause:g}s quiet: p50 "
            f"{result['settled_p50_ms']} ms -> {result['ratio_settled']}x; after "
            f"{args.quiet_gap:g}s of server quiet: p50 {result['after_quiet_p50_ms']} ms -> "
            f"{result['ratio_quiet']}x; "
            "first ten (run 1) "
            f"{result['first_ten_ms']}"
        )
        rows.append(result)
    references = {}
    if args.references:
        middle = args.lengths[len(args.lengths) // 2]
        for kind in ("careful", "echo"):
            ref = aggregate(measure(kind, middle, work / f"req-{middle}.npz"))
            ref["length"] = middle
            ref.pop("trace_ms")
            log(
                f"reference {kind} (length {middle}): first {ref['first_ms']:.2f} ms "
                f"({ref['first_ms_each']}), next p50 {ref['steady_p50_ms']:.2f} ms -> "
                f"{ref['ratio']:.2f}x; after quiet p50 {ref['after_quiet_p50_ms']} ms"
            )
            references[kind] = ref
    return {"rnnserve": rows, "references": references}


def save_response(target: str, requests: Path, out: Path) -> None:
    import grpc
    from loadgen import read_requests

    [request, *_] = read_requests(requests)[0]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/rnnserve.v1.Inference/Predict", request_serializer=None, response_deserializer=None
        )
        out.write_bytes(call(request, timeout=30))


def firsts(r: dict[str, Any]) -> str:
    return f"{r['first_ms']:.2f} ({', '.join(f'{v:.1f}' for v in r['first_ms_each'])})"


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"### Warm-up: `{payload['model']}` ({payload['model_source']})\n",
        f"{m['date']}, {m['cores']} cores ({m['cpu']}). For each case {payload['repeats']} "
        "fresh servers (medians reported; the first request of each in brackets); the HTTP/2 "
        f"connection is made before timing; then {payload['count']} sequential requests of the "
        f"same shape (their p50 is the steady state of the target), then {payload['pause']:g}s "
        f"of quiet and {payload['count']} more (settled: background compiles done), then "
        f"{payload.get('quiet_count', 0)} single requests each after "
        f"{payload.get('quiet_gap', 0):g}s of server quiet (after quiet: what any request meets "
        "on a warm server that was idle, as the first one was).\n",
    ]
    lines.append(common.provenance(payload))
    rows = [
        [
            r["length"],
            firsts(r),
            r["steady_p50_ms"],
            r["steady_p99_ms"],
            f"{r['ratio']:.2f}x",
            "met" if r["met"] else "**not met**",
            r.get("settled_p50_ms", "-"),
            f"{r['ratio_settled']:.2f}x" if r.get("ratio_settled") else "-",
            r.get("after_quiet_p50_ms") or "-",
            f"{r['ratio_quiet']:.2f}x" if r.get("ratio_quiet") else "-",
            " ".join(f"{v:.1f}" for v in r["first_ten_ms"]),
        ]
        for r in payload["results"]["rnnserve"]
    ]
    lines.append(
        common.md_table(
            [
                "length",
                "first ms",
                f"next {payload['count']}: p50 ms",
                "p99 ms",
                "first / p50",
                f"target <= {TARGET:g}x",
                "settled p50 ms",
                "first / settled p50",
                "after quiet p50 ms",
                "first / after quiet",
                "first ten requests (run 1), ms",
            ],
            rows,
        )
    )
    refs = payload["results"].get("references") or {}
    if refs:
        lines.append(
            "\nThe same measurement on the reference servers of `bench_predict.py` (careful: "
            "every batch-1 bucket compiled and one call per length run on its serving thread "
            "before the port opens):\n"
        )
        lines.append(
            common.md_table(
                [
                    "server",
                    "length",
                    "first ms",
                    "next p50 ms",
                    "first / p50",
                    "after quiet p50 ms",
                    "first / after quiet",
                ],
                [
                    [
                        {"careful": "(c) careful unbatched", "echo": "(e) gRPC echo"}[k],
                        r["length"],
                        firsts(r),
                        r["steady_p50_ms"],
                        f"{r['ratio']:.2f}x",
                        r.get("after_quiet_p50_ms") or "-",
                        f"{r['ratio_quiet']:.2f}x" if r.get("ratio_quiet") else "-",
                    ]
                    for k, r in refs.items()
                ],
            )
        )
    if payload.get("disturbance"):
        lines.append(f"\n- other processes busy at start: {'; '.join(payload['disturbance'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_signal_handlers()
    shipped = common.model_version_dir(args.model)
    args.version_dir = (args.version_dir or shipped).resolve()
    if not common.model_ready(args.version_dir) and args.wait_for_model > 0:
        common.wait_for_model(args.version_dir, args.wait_for_model)
    if not common.model_ready(args.version_dir):
        log(f"no model at {args.version_dir}; train it first or pass --version-dir")
        return 2
    source = "shipped" if args.version_dir == shipped.resolve() else f"stand-in {args.version_dir}"
    log(f"model {args.model}: {source}")
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
    payload = {
        "benchmark": "warmup",
        "model": args.model,
        "model_source": source,
        "model_path": str(args.version_dir / "model.keras"),
        "model_mtime": common.model_mtime(args.version_dir),
        "machine": machine,
        "disturbance": disturbance,
        "count": args.count,
        "pause": args.pause,
        "quiet_gap": args.quiet_gap,
        "quiet_count": args.quiet_count,
        "repeats": args.repeats,
        "target_ratio": TARGET,
        "results": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(["python", "benchmarks/bench_warmup.py", *(argv or sys.argv[1:])]),
    }
    common.publish("warmup", payload, markdown(payload), write=not args.no_write)
    log(f"done in {payload['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
