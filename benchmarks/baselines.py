"""Baseline servers of the same `rnnserve.v1.Inference/Predict` API, and the compute limit.

Each server answers one sequence per request with what rnnserve answers in the default output mode
for a many-to-one model: one `SequenceResult` (the true length, and the output's `sequence` tensor).
Each runs as its own process on 127.0.0.1 (grpc.aio, the generated servicer base):

* ``naive``   — `model.predict(x[None], verbose=0)` per request, in one worker thread.
* ``careful`` — rnnserve's own engine without batching: `build_plan` + `Forward` (XLA), compiled
  up front for the batch-1 bucket of every length in use, one call per request through
  `ModelRunner` at batch 1, in one worker thread off the event loop; never retraces.
* ``echo``    — the transport limit: decodes the request message and returns a prebuilt response
  (rnnserve's own answer to a typical request, so the same size); no numpy, no model.
* ``frontdoor`` — a diagnostic, not a competitor: `rnnserve serve` itself (same process setup,
  handlers, decoding, validation, metrics and encoding), except that its batcher answers each
  sequence with an answer rnnserve computed earlier for a sequence of the same length (the
  first of each length is computed for real), so responses have the real sizes. What
  rnnserve's own request path costs without batching or compute: the distance from rnnserve to
  it is what the batcher and the model cost, from it to echo what rnnserve's handler costs on
  top of gRPC.
* ``compute`` — not a server: the model's in-process batched throughput through rnnserve's
  `Forward` (XLA, every bucket compiled first) on padded batches of B sequences drawn from the
  given test split. Prints JSON.

Every server sets its long-lived objects aside from garbage collection once it is ready
(`rnnserve.server.heap.settle`), as rnnserve does.

    python benchmarks/baselines.py careful --model-dir models/japanese_vowels/1 --port 9001 \
        --lengths 7 8 9 ... 29
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import itertools
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rnnserve.client.tensors import from_tensor, to_tensor
from rnnserve.server import heap
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

Compute = Callable[[np.ndarray], np.ndarray]


def progress(message: str) -> None:
    print(f"[baseline {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class PredictServicer(pb_grpc.InferenceServicer):
    """`Predict` only: one sequence in, its sequence-level output out, computed by `compute` in
    a single worker thread (the event loop stays free for gRPC)."""

    def __init__(
        self, name: str, version: int, output: str, compute: Compute, step_shape: tuple[int, ...]
    ) -> None:
        self.name, self.version, self.output = name, version, output
        self.compute = compute
        self.step_shape = step_shape
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")

    def warm(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the worker thread before serving."""
        self.executor.submit(fn).result()

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        if len(request.sequences) != 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one sequence per request")
        try:
            x = from_tensor(request.sequences[0]).astype(np.float32, copy=False)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if x.ndim != 1 + len(self.step_shape) or x.shape[1:] != self.step_shape or not len(x):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad shape {list(x.shape)}")
        loop = asyncio.get_running_loop()
        y = await loop.run_in_executor(self.executor, self.compute, x)
        return pb.PredictResponse(
            model_name=self.name,
            model_version=self.version,
            results=[
                pb.SequenceResult(
                    length=len(x), outputs=[pb.OutputValue(name=self.output, sequence=to_tensor(y))]
                )
            ],
        )


class EchoServicer(pb_grpc.InferenceServicer):
    def __init__(self, response: pb.PredictResponse) -> None:
        self.response = response

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        return self.response


async def serve(servicer: pb_grpc.InferenceServicer, port: int) -> None:
    limit = 64 * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    # As rnnserve does once its models are loaded: the comparison is about batching, not about
    # full garbage collections walking the model's objects (~150 ms each, every few seconds).
    heap.settle(unloaded=False)
    await server.start()
    progress(f"{type(servicer).__name__} serving on 127.0.0.1:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)


# ---- models ----


def load_model(model_dir: Path) -> Any:
    import keras

    return keras.saving.load_model(model_dir / "model.keras", compile=False, safe_mode=True)


def naive_compute(model: Any) -> tuple[Compute, str, tuple[int, ...]]:
    def compute(x: np.ndarray) -> np.ndarray:
        y = model.predict(x[None], verbose=0)
        if isinstance(y, list | tuple):
            y = y[0]
        y = np.asarray(y)[0]
        return y[-1] if y.ndim == 2 else y  # a per-step head: its last step, as rnnserve

    step_shape = tuple(int(d) for d in model.inputs[0].shape[2:])
    return compute, str(model.output_names[0]), step_shape


def careful_runner(model: Any, lengths: Sequence[int], rows: int) -> Any:
    """rnnserve's engine: exact plan, XLA `Forward` with every bucket for `lengths` compiled."""
    from rnnserve.server.forward import Forward, bucket_length
    from rnnserve.server.plan import build_plan
    from rnnserve.server.runner import ModelRunner

    plan = build_plan(model)
    forward = Forward(plan, xla=True, max_rows=rows)
    buckets = sorted({bucket_length(n) for n in lengths})
    started = time.perf_counter()
    for steps in buckets:
        forward.compile(rows, steps)
    progress(
        f"compiled {len(buckets)} XLA buckets (rows {rows}, steps {buckets}) in "
        f"{time.perf_counter() - started:.1f}s"
    )
    return ModelRunner(forward)


def careful_compute(
    model: Any, lengths: Sequence[int]
) -> tuple[Compute, str, tuple[int, ...], Callable[[], None]]:
    """The compute function, and `warm`: one call per length, to run once more on the serving
    thread (the first TensorFlow call on a new thread costs a few milliseconds)."""
    runner = careful_runner(model, lengths, rows=1)
    plan = runner.forward.plan

    def compute(x: np.ndarray) -> np.ndarray:
        [row] = runner.run([x], [None])
        if isinstance(row, Exception):
            raise row
        head = row.heads[0]
        return head[-1] if row.stepped[0] else head

    def warm() -> None:
        for n in sorted(set(lengths)):
            compute(np.zeros((n, *plan.step_shape), np.float32))

    warm()
    return compute, plan.outputs[0].name, tuple(plan.step_shape), warm


# ---- compute limit ----


def compute_limit(args: argparse.Namespace) -> dict[str, Any]:
    from rnnserve.server.forward import pad_batch

    with np.load(args.data) as data:
        frames, offsets = data["frames"], data["offsets"]
    sequences = [frames[a:b] for a, b in itertools.pairwise(offsets)]
    model = load_model(Path(args.model_dir))
    runner = careful_runner(model, [len(s) for s in sequences], rows=args.batch)
    forward, plan = runner.forward, runner.forward.plan
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(args.pool):
        picks = rng.integers(0, len(sequences), args.batch)
        x, lengths = pad_batch([sequences[i] for i in picks], plan.step_shape, "float32")
        # On to the batch's compiled XLA bucket, as the server's runner pads it.
        rows, steps = forward.bucket(*x.shape[:2])
        bucketed = np.zeros((rows, steps, *x.shape[2:]), x.dtype)
        bucketed[: x.shape[0], : x.shape[1]] = x
        batches.append(
            (bucketed, np.concatenate([lengths, np.zeros(rows - len(lengths), np.int32)]))
        )
    for x, lengths in batches[:3]:
        forward(x, lengths)
    count = real = padded = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        x, lengths = batches[count % len(batches)]
        forward(x, lengths)
        count += 1
        real += int(lengths.sum())
        padded += int(x.shape[0] * x.shape[1])
    seconds = time.perf_counter() - started
    return {
        "batch": args.batch,
        "batches": count,
        "seconds": round(seconds, 3),
        "sequences_per_second": round(count * args.batch / seconds, 1),
        "timesteps_per_second": round(real / seconds, 1),
        "ms_per_batch": round(seconds / count * 1e3, 3),
        "padding_efficiency": round(real / padded, 3),
        "xla_buckets_compiled": len(getattr(forward, "_ready", getattr(forward, "_programs", ()))),
    }


# ---- command line ----


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = root.add_subparsers(dest="kind", required=True)
    for kind in ("naive", "careful"):
        p = sub.add_parser(kind)
        p.add_argument("--model-dir", required=True, help="models/<name>/<version>")
        p.add_argument("--name", required=True, help="model name to answer with")
        p.add_argument("--port", type=int, required=True)
        p.add_argument(
            "--lengths",
            type=int,
            nargs="*",
            default=[],
            help="sequence lengths in use (careful: compile their buckets)",
        )
        p.add_argument(
            "--no-warm-thread",
            dest="warm_thread",
            action="store_false",
            help="careful: do not run one call per length on the serving thread before serving",
        )
    sub.add_parser(
        "frontdoor",
        help="frontdoor serve [rnnserve serve flags]: rnnserve with its answers cached",
        add_help=False,
    )
    p = sub.add_parser("echo")
    p.add_argument("--response", required=True, help="file with a serialized PredictResponse")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("compute")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, help=".npz of the test split (frames, offsets)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--pool", type=int, default=64, help="distinct padded batches to cycle")
    p.add_argument("--seed", type=int, default=0)
    return root


def frontdoor(serve_argv: Sequence[str]) -> int:
    """`rnnserve serve_argv...` with the batcher short-circuited (see the module docstring)."""
    from rnnserve.server import batching
    from rnnserve.server.cli import main as rnnserve_main

    real_submit = batching.Batcher.submit_many
    answers: dict[tuple[str, int], Any] = {}

    def remember(key: tuple[str, int], future: asyncio.Future[Any]) -> None:
        """Keep the first real answer for this (model, length)."""
        if not future.cancelled() and future.exception() is None:
            answers.setdefault(key, future.result())

    def submit_many(
        self: batching.Batcher, sequences: Sequence[np.ndarray], *, deadline: float | None = None
    ) -> list[asyncio.Future[Any]]:
        keys = [(self.name, len(x)) for x in sequences]
        if not all(key in answers for key in keys):
            futures = real_submit(self, sequences, deadline=deadline)
            for key, future in zip(keys, futures, strict=True):
                future.add_done_callback(functools.partial(remember, key))
            return futures
        self.check_room(len(sequences))
        loop = asyncio.get_running_loop()
        futures = []
        for key in keys:
            future = loop.create_future()
            future.set_result(answers[key])
            futures.append(future)
        return futures

    batching.Batcher.submit_many = submit_many  # type: ignore[method-assign]
    return rnnserve_main(list(serve_argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["frontdoor"]:
        return frontdoor(argv[1:])
    args = parser().parse_args(argv)
    if args.kind == "compute":
        print(json.dumps(compute_limit(args)), flush=True)
        return 0
    servicer: pb_grpc.InferenceServicer
    if args.kind == "echo":
        servicer = EchoServicer(pb.PredictResponse.FromString(Path(args.response).read_bytes()))
    else:
        started = time.perf_counter()
        model = load_model(Path(args.model_dir))
        warm = None
        if args.kind == "naive":
            compute, output, step_shape = naive_compute(model)
        else:
            compute, output, step_shape, warm = careful_compute(model, args.lengths or [1])
        servicer = PredictServicer(args.name, 1, output, compute, step_shape)
        if warm is not None and args.warm_thread:
            servicer.warm(warm)
        progress(f"{args.kind}: model ready in {time.perf_counter() - started:.1f}s")
    asyncio.run(serve(servicer, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
