"""`rnnserve` command line: serve, predict, health, models, metadata."""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import os
import re
import signal
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _default_target() -> str:
    # Client commands talk to the local server unless told otherwise; in a container the health
    # check follows the port the server was given. Read when parsing, so that `main()` called in
    # a process sees the environment of that moment.
    port = os.environ.get("RNNSERVE_PORT", "8500")
    return os.environ.get("RNNSERVE_TARGET", f"127.0.0.1:{port}")


def _serve(args: argparse.Namespace) -> int:
    # TensorFlow is imported here only: the client commands stay light.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rnnserve.server import settings as settings_mod
    from rnnserve.server.logs import configure

    flags = {k: v for k, v in vars(args).items() if k not in {"command", "func"}}
    settings = settings_mod.load(flags)
    configure(settings.log_format, settings.log_level)
    return asyncio.run(_run_server(settings))


async def _run_server(settings: Any) -> int:
    import logging

    from rnnserve.server.app import Server
    from rnnserve.server.settings import CannotStart

    log = logging.getLogger("rnnserve")
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before loading, which takes tens of seconds: as PID 1 in a container a signal without a
    # handler is ignored, and a stop during loading would wait out the stop timeout.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if not starting.done():
        log.info("stop requested while starting; stopping")
        starting.cancel()
    try:
        await starting
    except asyncio.CancelledError:
        pass
    except (OSError, CannotStart) as exc:  # a port taken, a file missing: one line
        log.error("cannot start: %s", exc)
        code = 1
    else:
        await stopping  # serving until a signal comes
        log.info(
            "shutting down: finishing in-flight work (grace %.1fs; a second signal ends it now)",
            settings.grace,
        )
    stopping.cancel()

    def hurry() -> None:
        log.warning("second stop signal: cancelling the work still running")
        server.hurry()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry)
    await server.stop(grace=None if code == 0 else 0.0)
    log.info("stopped")
    if server.repository.threads_loading:
        # A model load cannot be stopped, and asyncio.run would wait for it (tens of seconds,
        # past a container's stop timeout). Everything worth keeping is done: leave now.
        log.info("not waiting for %d model loads still running", server.repository.threads_loading)
        logging.shutdown()
        os._exit(code)
    return code


def _read_sequences(
    paths: Sequence[str], tokens: Callable[[], bool]
) -> list[tuple[str, np.ndarray]]:
    """.npy (one [T, D] or [T] array), .npz (one sequence per array), .csv: float features with
    one row per timestep, or, for a model that takes token ids (`tokens()`, asked only when a
    .csv comes), the ids of one sequence in order. Each comes with its name: the file, or
    `file:array` for an array of an .npz."""
    named: list[tuple[str, np.ndarray]] = []
    for name in paths:
        path = Path(name)
        if path.suffix not in {".npy", ".npz", ".csv"}:
            raise SystemExit(f"{path}: expected a .npy, .npz or .csv file")
        try:
            if path.suffix == ".npz":
                with np.load(path) as archive:
                    named.extend((f"{name}:{key}", archive[key]) for key in archive.files)
            elif path.suffix == ".npy":
                named.append((name, _read_npy(path)))
            else:
                named.append((name, _read_csv(path, tokens)))
        except OSError as exc:  # missing, a directory, not allowed: one line, no traceback
            raise SystemExit(f"{path}: cannot read it: {exc.strerror or exc}") from None
        except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # not what its suffix says
            raise SystemExit(f"{path}: not a {path.suffix} file numpy can read ({exc})") from None
    return named


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def _numbers(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return False
    return True


def _read_npy(path: Path) -> np.ndarray:
    loaded = np.load(path)
    if not isinstance(loaded, np.ndarray):  # np.load opens any .npz archive, whatever its name
        loaded.close()
        raise SystemExit(f"{path}: an .npz archive named .npy; rename it to .npz")
    if loaded.ndim == 1 and loaded.dtype.kind == "f":  # one feature per step, as a 1-column .csv
        return loaded[:, None]
    return loaded


def _read_csv(path: Path, tokens: Callable[[], bool]) -> np.ndarray:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and not _numbers(lines[0]):
        lines = lines[1:]  # a header row
    if not lines:
        raise SystemExit(f"{path}: no rows of numbers; expected one row per timestep")
    try:
        values = np.loadtxt(lines, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise SystemExit(f"{path}: expected comma-separated numbers ({exc})") from None
    if not tokens():  # asked after the read: a file that cannot be read needs no server
        return values.astype(np.float32)
    ids = values.ravel()
    if not np.all(ids == np.round(ids)):
        raise SystemExit(f"{path}: the model takes integer token ids; this file has fractions")
    return ids.astype(np.int64)


def _tls(args: argparse.Namespace) -> Any:
    from rnnserve.client import TLS

    if not (args.tls or args.ca or args.cert):
        return None
    return TLS(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)


def _client(args: argparse.Namespace) -> Any:
    from rnnserve.client import Client

    token = args.token or os.environ.get("RNNSERVE_TOKEN")
    return Client(args.target, tls=_tls(args), token=token, timeout=args.timeout)


def _predict(args: argparse.Namespace) -> int:
    import grpc

    with _client(args) as client:

        def tokens() -> bool:
            return bool(client.metadata(args.model, args.version).input_dtype.startswith("int"))

        named = _read_sequences(args.files, functools.cache(tokens))
        try:
            predictions = client.predict(
                args.model,
                [sequence for _, sequence in named],
                version=args.version,
                output=args.output,
                top_k=args.top_k,
            )
        except grpc.RpcError as err:
            return _refused(err, _name_sequence(err.details() or "", [n for n, _ in named]))
        labels: dict[str, tuple[str, ...]] = {}
        if any(o.step_classes is not None for p in predictions for o in p.outputs.values()):
            info = client.metadata(args.model, args.version)
            labels = {o.name: o.labels for o in info.outputs}
    rows = []
    for (name, _), p in zip(named, predictions, strict=True):
        row: dict[str, Any] = {"input": name, "length": p.length}
        for out in p.outputs.values():
            value: dict[str, Any] = {}
            if out.top_k:
                value["top_k"] = [
                    {"label": c.label, "index": c.index, "score": c.score} for c in out.top_k
                ]
            if out.sequence is not None:
                value["sequence"] = out.sequence.tolist()
            if out.steps is not None:
                value["steps"] = out.steps.tolist()
            if out.step_classes is not None:
                value["step_classes"] = out.step_classes.tolist()
                names = labels.get(out.name)
                if names:
                    value["step_labels"] = [names[c] for c in out.step_classes]
            row[out.name] = value
        rows.append(row)
    for row in rows:
        print(json.dumps(row))
    return 0


def _name_sequence(details: str, names: Sequence[str]) -> str:
    """The server's `sequence N` (its index across all files) followed by the file holding it."""

    def named(match: re.Match[str]) -> str:
        index = int(match[1])
        return f"{match[0]} ({names[index]})" if index < len(names) else match[0]

    return re.sub(r"\bsequence (\d+)\b", named, details, count=1)


def _health(args: argparse.Namespace) -> int:
    import grpc

    with _client(args) as client:
        try:
            ok = client.health(args.model, timeout=args.timeout)
        except grpc.RpcError as err:
            details = err.details()
            if args.model and err.code() == grpc.StatusCode.NOT_FOUND:
                # The health service gives no message for a service it does not know.
                details = f"the server serves no model named {args.model!r}{_served(client)}"
            print(f"unhealthy: {err.code().name}: {details}", file=sys.stderr)
            return 1
    print("SERVING" if ok else "NOT_SERVING")
    return 0 if ok else 1


def _served(client: Any) -> str:
    """` (it serves: a, b)` from ListModels, or nothing if that call fails (it may need a token
    where health does not)."""
    import grpc

    try:
        names = sorted(model.name for model in client.list_models().models)
    except grpc.RpcError:
        return ""
    return f" (it serves: {', '.join(names) or 'none'})"


def _models(args: argparse.Namespace) -> int:
    from rnnserve.v1 import inference_pb2 as pb

    with _client(args) as client:
        listing = client.list_models()
    for model in listing.models:
        for v in model.versions:
            state = pb.ModelState.Name(v.state).removeprefix("MODEL_STATE_").lower()
            error = f"  {v.error}" if v.error else ""
            print(f"{model.name}\t{v.version}\t{state}{error}")
    return 0


def _metadata(args: argparse.Namespace) -> int:
    import dataclasses

    with _client(args) as client:
        info = client.metadata(args.model, args.version)
    print(json.dumps(dataclasses.asdict(info), indent=2))
    return 0


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=_default_target(),
        help="server address host:port (default: %(default)s; env RNNSERVE_TARGET, else "
        "127.0.0.1:$RNNSERVE_PORT, else 127.0.0.1:8500)",
    )
    parser.add_argument("--timeout", type=_seconds, default=30.0, help="seconds per call")
    parser.add_argument("--token", help="bearer token (or env RNNSERVE_TOKEN)")
    parser.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CAs unless --ca is given"
    )
    parser.add_argument(
        "--ca",
        default=os.environ.get("RNNSERVE_CA"),
        help="CA certificate to verify the server (enables TLS; or env RNNSERVE_CA)",
    )
    parser.add_argument("--cert", help="client certificate for mutual TLS")
    parser.add_argument("--key", help="client private key for mutual TLS")
    parser.add_argument(
        "--server-name",
        default=os.environ.get("RNNSERVE_SERVER_NAME"),
        help="name expected in the server certificate (or env RNNSERVE_SERVER_NAME)",
    )


_MODEL_VERSION = "model version (0: the latest ready one)"


def parser() -> argparse.ArgumentParser:
    from rnnserve.server.settings import add_arguments

    root = argparse.ArgumentParser(prog="rnnserve", description=__doc__)
    # Only before the command: after it, `--version` is the model version of predict/metadata.
    root.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('rnnserve')}",
        help="print the installed rnnserve version and exit",
    )
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve the model repository over gRPC",
        description="Serve Keras recurrent models over gRPC. Each setting comes from its flag, "
        "else its RNNSERVE_* environment variable, else the --config TOML file, else its default.",
    )
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    predict = sub.add_parser(
        "predict",
        help="send sequences from .npy/.npz/.csv files",
        description="One sequence per .npy file, per array of a .npz, per .csv (float features: "
        "a row per timestep; token ids: the ids in order). Prints one JSON line per sequence.",
    )
    predict.add_argument("model")
    predict.add_argument("files", nargs="+")
    predict.add_argument("--version", type=int, default=0, help=_MODEL_VERSION)
    predict.add_argument(
        "--output",
        default="default",
        choices=["default", "sequence", "steps", "both"],
        help="default: each output in its own kind (a row per sequence for a many-to-one head, "
        "a row per timestep for a per-step head); sequence: a row per sequence for every head; "
        "steps: a row per timestep for every head; both (default: %(default)s)",
    )
    predict.add_argument(
        "--top-k",
        type=int,
        default=3,
        help="for outputs with labels, the best classes to show (0: none; default: %(default)s)",
    )
    _client_flags(predict)
    predict.set_defaults(func=_predict)

    health = sub.add_parser(
        "health",
        help="exit 0 when the server (or --model) is serving",
        description="Check that the server, or one model with --model, is serving: prints "
        "SERVING and exits 0, else says why and exits 1 (also when no answer comes within "
        "--timeout, 5 s by default).",
    )
    health.add_argument("--model", default="", help="check one model instead of the server")
    _client_flags(health)
    health.set_defaults(func=_health, timeout=5.0)

    models = sub.add_parser(
        "models",
        help="list models, versions and their states",
        description="One line per model version: name, version, state (loading, ready, "
        "draining, failed) and, for a failed one, why. Version 0 of a model is the model "
        "as a whole (a broken config.json, ignored version directories).",
    )
    _client_flags(models)
    models.set_defaults(func=_models)

    metadata = sub.add_parser("metadata", help="show a model's inputs, outputs and abilities")
    metadata.add_argument("model")
    metadata.add_argument("--version", type=int, default=0, help=_MODEL_VERSION)
    _client_flags(metadata)
    metadata.set_defaults(func=_metadata)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import grpc

    try:
        return int(args.func(args))
    except grpc.RpcError as err:
        return _refused(err, err.details())


def _refused(err: Any, details: str | None) -> int:
    # A refusal is an answer: its status and message, no traceback.
    print(f"error: {err.code().name}: {details}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
