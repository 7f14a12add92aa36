"""Shared helpers for the benchmark scripts: child processes (started in their own process groups
and always stopped), free ports, readiness probes, temporary model repositories, test data export,
machine description, Prometheus scraping and result files.

Also a small command line used by the drivers to export a recipe's test split without importing
TensorFlow into the driver process:

    python benchmarks/common.py export-data japanese_vowels out.npz
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = REPO / "models"
RESULTS = HERE / "results"
PYTHON = sys.executable
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- processes ----


class Children:
    """Processes this benchmark started. Each runs in its own session (process group), so stopping
    it also stops anything it spawned; `stop_all` runs on exit, errors and Ctrl-C alike."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Any:
        log_path = self.log_dir / f"{name}.log"
        out = log_path.open("ab")
        self._files.append(out)
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        full_env.update(env or {})
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=full_env,
            start_new_session=True,
        )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
        """SIGTERM the child's process group, wait, then SIGKILL it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        else:  # the leader exited; make sure nothing it spawned lingers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT (even when started with SIGINT ignored, as background jobs of a
    non-interactive shell are) raise KeyboardInterrupt: the `finally` blocks stop every child."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def run_json(argv: Sequence[str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run a helper process to completion (in its own group, killed on timeout or Ctrl-C); its
    last stdout line is a JSON document."""
    with log_path.open("ab") as err:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    text = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not text:
        raise RuntimeError(
            f"{' '.join(argv[:3])} ... exited {proc.returncode}; see {log_path}:\n{tail(log_path)}"
        )
    return dict(json.loads(text[-1]))


# ---- servers ----


def wait_ready(target: str, proc: subprocess.Popen[bytes], timeout: float, probe: bytes) -> float:
    """Wait until a Predict with `probe` (serialized PredictRequest) succeeds; seconds waited."""
    import grpc

    started = time.perf_counter()
    deadline = started + timeout
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/rnnserve.v1.Inference/Predict", request_serializer=None, response_deserializer=None
        )
        while True:
            if proc.poll() is not None:
                log_path = getattr(proc, "log_path", "?")
                raise RuntimeError(
                    f"server exited with {proc.returncode} before it was ready; see {log_path}:\n"
                    + tail(Path(str(log_path)))
                )
            try:
                call(probe, timeout=10.0)
                return time.perf_counter() - started
            except grpc.RpcError:
                if time.perf_counter() > deadline:
                    raise TimeoutError(
                        f"server on {target} not ready after {timeout:.0f}s"
                    ) from None
                time.sleep(0.25)


def wait_port(target: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait until the server accepts an HTTP/2 connection (gRPC channel ready)."""
    import grpc

    started = time.perf_counter()
    while True:
        if proc.poll() is not None:
            log_path = Path(str(getattr(proc, "log_path", "?")))
            raise RuntimeError(
                f"server exited with {proc.returncode}; see {log_path}:\n{tail(log_path)}"
            )
        with grpc.insecure_channel(target) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1.0)
                return time.perf_counter() - started
            except grpc.FutureTimeoutError:
                pass
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"server on {target} not listening after {timeout:.0f}s")


def rnnserve_argv(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        str(BIN / "rnnserve"),
        "serve",
        "--model-dir",
        str(model_dir),
        "--host",
        HOST,
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--log-level",
        "info",
        *extra,
    ]


def model_version_dir(name: str, models_root: Path = MODELS, version: int = 1) -> Path:
    return models_root / name / str(version)


def model_ready(version_dir: Path) -> bool:
    return (version_dir / "model.keras").is_file() and (version_dir / "config.json").is_file()


def wait_for_model(version_dir: Path, timeout: float) -> bool:
    """Poll for a model that is being trained; True once its files exist and stopped changing."""
    deadline = time.monotonic() + timeout
    announced = False
    while time.monotonic() < deadline:
        if model_ready(version_dir):
            size = (version_dir / "model.keras").stat().st_size
            time.sleep(2.0)
            if (version_dir / "model.keras").stat().st_size == size:
                return True
        elif not announced:
            log(f"waiting up to {timeout:.0f}s for {version_dir} (being trained)")
            announced = True
        time.sleep(5.0)
    return model_ready(version_dir)


def make_repo(
    root: Path, name: str, version_dir: Path, batching: dict[str, Any] | None = None
) -> Path:
    """A model repository holding only `name` version 1: the model file symlinked, the config
    copied (with `batching` keys replaced when given)."""
    target = root / name / "1"
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.keras").symlink_to((version_dir / "model.keras").resolve())
    config = json.loads((version_dir / "config.json").read_text())
    if batching is not None:
        config["batching"] = {**config.get("batching", {}), **batching}
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return root


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rnnbench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


# ---- data ----


def export_data(recipe_dir: Path, out: Path, log_path: Path) -> dict[str, Any]:
    """Write the recipe's test split to `out` (.npz: `frames` concatenated, `offsets`) in a
    helper process (the recipe imports Keras)."""
    argv = [PYTHON, str(HERE / "common.py"), "export-data", str(recipe_dir), str(out)]
    return run_json(argv, log_path, timeout=300)


def load_sequences(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        frames, offsets = data["frames"], data["offsets"]
    return [frames[a:b] for a, b in itertools.pairwise(offsets)]


def _export_main(recipe_dir: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("bench_recipe", Path(recipe_dir) / "recipe.py")
    assert spec is not None
    assert spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    sequences, _labels = recipe.load_test_split()
    arrays = [np.ascontiguousarray(s, dtype=np.float32) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in arrays])]).astype(np.int64)
    np.savez(out, frames=np.concatenate(arrays), offsets=offsets)
    lengths = [len(s) for s in arrays]
    print(json.dumps({"count": len(arrays), "min": min(lengths), "max": max(lengths)}))


# ---- machine, metrics, results ----


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu")
        if version("tensorflow-cpu") != "-"
        else version("tensorflow"),
        "keras": version("keras"),
        "grpcio": version("grpcio"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
    }


def git_state() -> str:
    """The commit measured, and whether server/ or client/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "server", "client", "proto"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    if not dirty:
        return head
    digest = hashlib.sha1()
    for path in sorted([*REPO.glob("server/*.py"), *REPO.glob("client/*.py")]):
        digest.update(path.read_bytes())
    return f"{head} + uncommitted changes in server/client (sources sha1 {digest.hexdigest()[:10]})"


def model_mtime(version_dir: Path) -> str:
    stamp = (version_dir / "model.keras").stat().st_mtime
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def survey() -> tuple[dict[str, Any], list[str]]:
    """Every driver's start: the machine's facts, and the other processes busy now (logged, and
    kept with the results, since they disturb the figures)."""
    facts = machine()
    disturbance = busy_others()
    if disturbance:
        log(f"other busy processes (they disturb the figures): {disturbance}")
    return facts, disturbance


def busy_others(exclude: Sequence[int] = ()) -> list[str]:
    """Other processes using CPU right now (anything that disturbs the measurement)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
            procs.append(p)
    time.sleep(0.5)
    busy = []
    me = {os.getpid(), *exclude}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            pct = p.cpu_percent(None)
            if pct >= 10 and p.pid not in me:
                cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:80]
                busy.append(f"pid {p.pid} {pct:.0f}% {cmd}")
    return busy


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from 127.0.0.1:port/metrics, summed over labels, by metric name (labels
    kept for `rnnserve_session_ends_total`)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    pattern = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        if name == "rnnserve_session_ends_total" and labels:
            reason = re.search(r'reason="([^"]*)"', labels)
            name = f"{name}[{reason.group(1) if reason else ''}]"
        with contextlib.suppress(ValueError):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def server_cpu(cpu: dict[str, float]) -> tuple[float | str, float | str]:
    """From a load generator's `cpu_cores` (one watched server): the server's cores and its
    busiest thread's, or "" where not measured."""
    server = next((k for k in cpu if k.startswith("pid") and "_" not in k), "")
    return cpu.get(server, ""), cpu.get(f"{server}_busiest_thread", "")


def publish(
    stem: str,
    payload: dict[str, Any],
    markdown: str,
    *,
    write: bool,
    directory: Path | None = None,
) -> None:
    """Print the markdown; unless told not to, write `<directory>/<stem>.json` and `.md`
    (by default in benchmarks/results)."""
    print(markdown)
    if write:
        directory = directory or RESULTS
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
        md_path.write_text(markdown)
        log(f"wrote {json_path} and {md_path}")


def provenance(payload: dict[str, Any]) -> str:
    """One line: the model file measured and the code state."""
    return (
        f"Model file `{Path(payload['model_path']).relative_to(REPO)}` of "
        f"{payload['model_mtime']}; code at {payload['machine']['git']}; command "
        f"`{payload['command']}`.\n"
        if str(payload["model_path"]).startswith(str(REPO))
        else f"Model file `{payload['model_path']}` of {payload['model_mtime']}; code at "
        f"{payload['machine']['git']}; command `{payload['command']}`.\n"
    )


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-data", help="a recipe's test split to .npz")
    export.add_argument("recipe_dir")
    export.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "export-data":
        _export_main(args.recipe_dir, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
