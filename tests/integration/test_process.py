"""The server as a process, as operators run it: `rnnserve serve`, SIGTERM with work in flight,
`rnnserve health`, `rnnserve predict`, and the Dockerfile's own commands run outside Docker."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.client import Client, RetryPolicy
from rnnserve.client.tensors import to_tensor
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

import zoo

ROOT = Path(__file__).resolve().parents[2]
RNNSERVE = str(Path(sys.executable).parent / "rnnserve")
NO_RETRY = RetryPolicy(max_attempts=1)
CLI_TIMEOUT = 120  # seconds for one CLI command (it imports TensorFlow for some)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Ports free now, all different (each probe is held until all are chosen)."""
    with ExitStack() as held:
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


@contextmanager
def server_process(
    tmp: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    port: int | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`port`: pass one chosen with `free_ports` beside the other ports a test needs."""
    port = int((env or {}).get("RNNSERVE_PORT", 0)) or port or free_port()
    log = (tmp / f"server-{port}.log").open("wb")
    full_env = {**os.environ, **(env or {})}
    cmd = [*(command or [RNNSERVE, "serve"]), *args]
    if "RNNSERVE_PORT" not in (env or {}):
        cmd += ["--port", str(port)]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        with Client(target, retry=NO_RETRY) as client:
            while True:
                assert process.poll() is None, (tmp / f"server-{port}.log").read_text()[-3000:]
                try:
                    if client.health(timeout=2):
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server did not become healthy"
                time.sleep(0.2)
        yield process, target
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        log.close()


def test_sigterm_finishes_in_flight_work_refuses_new_and_keeps_sessions(
    zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    snapshot = tmp_path / "sessions.bin"
    port, metrics_port = free_ports(2)
    args = [
        "--model-dir",
        str(root),
        "--metrics-port",
        str(metrics_port),
        "--grace",
        "30",
        "--session-snapshot",
        str(snapshot),
        "--no-warmup",  # (the Dockerfile test below starts with it)
    ]
    rng = np.random.default_rng(0)
    heavy = [rng.normal(size=(3000, zoo.D)).astype(np.float32) for _ in range(64)]
    with server_process(tmp_path, args, port=port) as (process, target):
        with Client(target, retry=NO_RETRY, timeout=120) as client:
            session = client.open_session("lstm_masked")
            client.step(session.session_id, heavy[0][:40])
            # A stream held open between chunks must not hold up the shutdown.
            idle = IdleStream(target, "lstm_masked", heavy[1][:30])
            results: list[Any] = []
            senders = _senders(client, heavy, 4, results)
            for t in senders:
                t.start()
            _wait_until_queued(metrics_port, len(senders) * len(heavy), steps=3000)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert _refused_once_draining(client).code() == grpc.StatusCode.UNAVAILABLE
            ended = idle.end(timeout=10)
            assert ended.code() == grpc.StatusCode.UNAVAILABLE
            assert f"resume session {idle.session_id} later" in (ended.details() or "")
            for t in senders:
                t.join(120)
        code = process.wait(60)
        assert code == 0
        assert time.monotonic() - signalled < 30
    assert len(results) == 4
    for result in results:
        assert not isinstance(result, grpc.RpcError), result
        assert [p.length for p in result] == [3000] * 64
    assert snapshot.exists()
    with server_process(tmp_path, args, port=port) as (_, target), Client(target) as client:
        resumed = client.step(session.session_id, heavy[0][40:50], offset=40)
        assert resumed.total_steps == 50
        streamed = client.step(idle.session_id, heavy[1][30:35], offset=30)
        assert streamed.total_steps == 35
        # Restored and serving: a crash from here on must not bring back these older states.
        assert not snapshot.exists()


def test_a_second_signal_ends_the_grace_period_and_still_saves_sessions(
    zoo_repository: Any, tmp_path: Path
) -> None:
    """The first SIGTERM lets the queued work finish (up to `--grace`, here 120 s); a second one
    cancels what still runs, saves the sessions and exits at once, as an operator pressing Ctrl-C
    twice expects. (Before, the second signal was ignored: 41 s here.)"""
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    snapshot = tmp_path / "sessions.bin"
    port, metrics_port = free_ports(2)
    args = ["--model-dir", str(root), "--metrics-port", str(metrics_port), "--grace", "120"]
    # One sequence per batch, without XLA: the queued work takes ~40 s here, not 2.
    args += ["--session-snapshot", str(snapshot), "--no-warmup", "--max-batch-size", "1"]
    args += ["--no-xla"]
    rng = np.random.default_rng(1)
    heavy = [rng.normal(size=(3000, zoo.D)).astype(np.float32) for _ in range(64)]
    senders = 12
    log = tmp_path / f"server-{port}.log"
    with (
        server_process(tmp_path, args, port=port) as (process, target),
        Client(target, retry=NO_RETRY, timeout=300) as client,
    ):
        session = client.open_session("lstm_masked")
        client.step(session.session_id, heavy[0][:40])
        results: list[Any] = []
        threads = _senders(client, heavy, senders, results)
        for t in threads:
            t.start()
        _wait_until_queued(metrics_port, senders * len(heavy), steps=3000)
        process.send_signal(signal.SIGTERM)
        assert _refused_once_draining(client).code() == grpc.StatusCode.UNAVAILABLE
        time.sleep(1)
        assert process.poll() is None  # still finishing the queued work
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        took = time.monotonic() - signalled
        for t in threads:
            t.join(60)
    said = log.read_text()
    assert code == 0, said[-3000:]
    assert took < 15, said[-3000:]
    assert "second stop signal" in said
    assert "Traceback" not in said
    assert len(results) == senders
    cut = [r for r in results if isinstance(r, grpc.RpcError)]
    assert cut, "every request finished: the work was too small to show the second signal"
    assert {r.code() for r in cut} <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    with server_process(tmp_path, args, port=port) as (_, target), Client(target) as client:
        resumed = client.step(session.session_id, heavy[0][40:50], offset=40)
        assert resumed.total_steps == 50


def _senders(
    client: Client, heavy: list[np.ndarray], count: int, results: list[Any]
) -> list[threading.Thread]:
    """Threads (not started) that each send `heavy` in one Predict and keep the outcome."""

    def send() -> None:
        try:
            results.append(client.predict("lstm_masked", heavy, output="sequence"))
        except grpc.RpcError as err:
            results.append(err)

    return [threading.Thread(target=send) for _ in range(count)]


def _wait_until_queued(metrics_port: int, sequences: int, steps: int) -> None:
    """Until every one of `sequences` heavy sequences (`steps` long) is queued or computed: the
    queue depth plus what was computed, short by at most one batch being computed."""
    in_one_batch = 32768 // steps  # --max-batch-timesteps (default) / steps
    deadline = time.monotonic() + 60
    while True:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            samples = {
                s.name: s.value
                for family in text_string_to_metric_families(response.read().decode())
                for s in family.samples
            }
        queued = samples.get("rnnserve_queue_depth", 0)
        computed = samples.get("rnnserve_real_timesteps_total", 0) // steps
        if queued + computed >= sequences - in_one_batch:
            return
        assert time.monotonic() < deadline, f"only {queued} queued and {computed} computed"
        time.sleep(0.05)


def _refused_once_draining(client: Client) -> grpc.RpcError:
    """The first refusal after SIGTERM. A probe that got in before the server began to drain
    waits behind the heavy work and runs out of its short deadline; one that reaches gRPC in the
    instant its listener stops is cancelled by gRPC (CANCELLED, which clients retry); the next
    one is sent."""
    passing = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.predict("lstm_masked", [np.ones((5, zoo.D), np.float32)], timeout=0.3)
        except grpc.RpcError as err:
            if err.code() not in passing:
                return err
    raise AssertionError("no refusal within 30 s of SIGTERM")


class IdleStream:
    """A `Stream` session that sent one chunk and then waits, as a client between chunks does."""

    def __init__(self, target: str, model: str, chunk: np.ndarray) -> None:
        self.channel = grpc.insecure_channel(target)
        self.outbox: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        stub = pb_grpc.InferenceStub(self.channel)
        self.responses = stub.Stream(iter(self.outbox.get, None), timeout=120)
        self.outbox.put(pb.StreamRequest(open=pb.StreamOpen(model_name=model)))
        self.session_id = next(self.responses).opened.session_id
        self.outbox.put(pb.StreamRequest(chunk=pb.Chunk(data=to_tensor(chunk))))
        assert next(self.responses).step.steps == len(chunk)

    def end(self, timeout: float) -> grpc.RpcError:
        """Wait for the server to end the stream; returns its status."""
        box: list[Any] = []
        reader = threading.Thread(target=lambda: box.append(self._read_to_end()), daemon=True)
        reader.start()
        reader.join(timeout)
        self.outbox.put(None)
        self.channel.close()
        assert box, f"the stream was not ended within {timeout} s"
        assert isinstance(box[0], grpc.RpcError), box[0]
        return box[0]

    def _read_to_end(self) -> Any:
        try:
            return list(self.responses)
        except grpc.RpcError as err:
            return err


def test_a_damaged_session_snapshot_does_not_stop_the_server(
    zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    snapshot = tmp_path / "sessions.bin"
    args = ["--model-dir", str(root), "--metrics-port", "-1", "--session-snapshot", str(snapshot)]
    args.append("--no-warmup")
    with server_process(tmp_path, args) as (process, target):
        with Client(target, retry=NO_RETRY) as client:
            ids = [client.open_session("lstm_masked").session_id for _ in range(2)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    data = snapshot.read_bytes()
    snapshot.write_bytes(data[: len(data) - 3])  # the second record cut short
    with server_process(tmp_path, args) as (_, target), Client(target, retry=NO_RETRY) as client:
        assert client.step(ids[0], np.ones((3, zoo.D), np.float32), offset=0).total_steps == 3
        with pytest.raises(grpc.RpcError) as lost:
            client.step(ids[1], np.ones((3, zoo.D), np.float32))
        assert lost.value.code() == grpc.StatusCode.NOT_FOUND
    assert (tmp_path / "sessions.bin.bad").read_bytes() == data[: len(data) - 3]


def test_health_and_predict_commands(zoo_repository: Any, tmp_path: Path) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    seq = np.random.default_rng(1).normal(size=(11, zoo.D)).astype(np.float32)
    np.save(tmp_path / "a.npy", seq)
    np.savetxt(tmp_path / "b.csv", seq[:4], delimiter=",")
    args = ["--model-dir", str(root), "--metrics-port", "-1", "--no-warmup"]
    with server_process(tmp_path, args) as (_, target):
        ok = subprocess.run(
            [RNNSERVE, "health", "--target", target],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "SERVING"
        model = [RNNSERVE, "health", "--target", target, "--model"]
        assert (
            subprocess.run(
                [*model, "lstm_masked"], capture_output=True, timeout=CLI_TIMEOUT
            ).returncode
            == 0
        )
        missing = subprocess.run(
            [*model, "nope"], capture_output=True, text=True, timeout=CLI_TIMEOUT
        )
        assert missing.returncode == 1
        assert "NOT_FOUND" in missing.stderr
        out = subprocess.run(
            [
                RNNSERVE,
                "predict",
                "lstm_masked",
                str(tmp_path / "a.npy"),
                str(tmp_path / "b.csv"),
                "--target",
                target,
                "--top-k",
                "2",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=CLI_TIMEOUT,
        )
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [r["length"] for r in rows] == [11, 4]
        assert len(rows[0]["label"]["top_k"]) == 2
        want = zoo.Reference(zoo_repository[1]["lstm_masked"])(seq)[0]
        np.testing.assert_allclose(rows[0]["label"]["sequence"], want, atol=1e-5, rtol=0)
    down = subprocess.run(
        [RNNSERVE, "health", "--target", target, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert down.returncode == 1
    assert "unhealthy" in down.stderr


def _dockerfile() -> tuple[dict[str, str], list[str], list[str]]:
    """ENV, ENTRYPOINT and HEALTHCHECK CMD of the runtime stage, as Docker would read them."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split("FROM python:3.11-slim\n")[-1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in shlex.split(line[4:])))
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", runtime, re.M).group(1))  # type: ignore[union-attr]
    health = json.loads(re.search(r"HEALTHCHECK .*CMD (\[.*\])", runtime).group(1))  # type: ignore[union-attr]
    return env, entrypoint, health


def test_dockerfile_entrypoint_and_healthcheck_run_outside_docker(tmp_path: Path) -> None:
    env, entrypoint, health = _dockerfile()
    assert env["RNNSERVE_HOST"] == "0.0.0.0"
    assert entrypoint == ["rnnserve", "serve"]
    # Here: loopback only, free ports, and the paths the image would COPY into place.
    port, metrics_port = free_ports(2)
    env.update(
        RNNSERVE_HOST="127.0.0.1",
        RNNSERVE_PORT=str(port),
        RNNSERVE_METRICS_PORT=str(metrics_port),
        RNNSERVE_MODEL_DIR=str(ROOT / "models"),
        RNNSERVE_SESSION_SNAPSHOT=str(tmp_path / "sessions.bin"),
    )
    command = [RNNSERVE if c == "rnnserve" else c for c in entrypoint]
    with server_process(tmp_path, [], env=env, command=command) as (process, _):
        check = [RNNSERVE if c == "rnnserve" else c for c in health]
        result = subprocess.run(
            check, env={**os.environ, **env}, capture_output=True, text=True, timeout=CLI_TIMEOUT
        )
        assert result.returncode == 0, result.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    # The image starts with the warm-up (the other process tests skip it): it ran, for all three.
    assert "front door warmed with 3 models" in (tmp_path / f"server-{port}.log").read_text()


def test_wheel_carries_every_package(tmp_path: Path) -> None:
    """What the Dockerfile's build stage installs: one wheel with server, client and API."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("rnnserve-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "rnnserve/__init__.py",
        "rnnserve/v1/inference_pb2.py",
        "rnnserve/v1/inference.proto",
        "rnnserve/server/app.py",
        "rnnserve/server/cli.py",
        "rnnserve/client/sync.py",
        "rnnserve/training/spec.py",
    ):
        assert needed in names, f"{needed} missing from the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rnnserve = rnnserve.server.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_health_gives_up_after_its_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that accepts the connection and never answers: `rnnserve health --timeout` is
    what bounds the wait (a container's health check counts on it)."""
    from rnnserve.server.cli import main

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code = main(["health", "--target", target, "--timeout", "0.5"])
        took = time.monotonic() - started
    assert code == 1
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err
    assert took < 4.5  # the built-in default is 5 s


def test_client_commands_report_a_refusal_without_a_traceback(
    zoo_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from rnnserve.server.cli import main

    assert main(["metadata", "no_such_model", "--target", zoo_server.target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NOT_FOUND: model 'no_such_model' is not served")
    assert "Traceback" not in err


def test_predict_reads_a_csv_as_the_model_takes_it(
    zoo_server: Any, zoo_repository: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .csv holds float features, one row per timestep, or, for a model that takes token ids,
    the ids of one sequence: each is sent as the model expects (ids used to go as floats and be
    refused)."""
    from rnnserve.server.cli import main

    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
    (tmp_path / "ids.csv").write_text("3,1,4,1\n5,9,2,6\n")
    (tmp_path / "half.csv").write_text("3,1.5\n")
    model = "embedding_masked"
    assert main(["predict", model, str(tmp_path / "ids.csv"), "--target", zoo_server.target]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["length"] == len(ids)
    want = zoo.Reference(zoo_repository[1][model])(ids)[0]
    np.testing.assert_allclose(row["label"]["sequence"], want, atol=1e-5, rtol=0)

    with pytest.raises(SystemExit, match="integer token ids; this file has fractions"):
        main(["predict", model, str(tmp_path / "half.csv"), "--target", zoo_server.target])


def test_a_taken_port_stops_the_start_at_once_with_one_line(
    zoo_repository: Any, tmp_path: Path
) -> None:
    """The gRPC or the metrics port already in use: the server says so in one line and exits 1
    before loading any model (it used to load and warm up every model first, then die with a
    traceback)."""
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags, said in [
            (["--port", port, "--metrics-port", "-1"], f"cannot bind 127.0.0.1:{port}"),
            (["--port", "0", "--metrics-port", port], f"cannot serve metrics on 127.0.0.1:{port}"),
        ]:
            ran = subprocess.run(
                [RNNSERVE, "serve", "--model-dir", str(root), *flags],
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
            )
            assert ran.returncode == 1, ran.stderr[-2000:]
            assert f"cannot start: {said}" in ran.stderr, ran.stderr[-2000:]
            assert "Traceback" not in ran.stderr
            assert "loaded lstm_masked" not in ran.stderr  # refused before loading


def test_a_missing_model_directory_stops_the_start(tmp_path: Path) -> None:
    """A mistyped --model-dir used to start a server that served nothing (health NOT_SERVING)
    and never would: now the start ends at once with one line naming the directory."""
    missing = tmp_path / "modles"
    ran = subprocess.run(
        [RNNSERVE, "serve", "--model-dir", str(missing), "--port", "0", "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert ran.returncode == 1, ran.stderr[-2000:]
    assert f"cannot start: model repository {missing} is not a directory" in ran.stderr
    assert "Traceback" not in ran.stderr


def _wait_for_line(log: Path, line: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while line not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {line!r} in {log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_models_load_stops_at_once_and_keeps_the_snapshot(
    zoo_repository: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    """The handlers are in place before loading: SIGTERM used to kill the process outright (and,
    as PID 1 in a container, to be ignored until the models had loaded), SIGINT to wait for the
    load and end in a traceback. Now both stop the start cleanly, without waiting for the load
    thread, and leave the session snapshot that was not read yet as it was."""
    root = zoo.subset(zoo_repository[0], ["stacked_norm_steps"], tmp_path / "models")
    snapshot = tmp_path / "sessions.bin"
    snapshot.write_bytes(b"sessions of the last run")
    log = tmp_path / "server.log"
    cmd = [RNNSERVE, "serve", "--model-dir", str(root), "--port", "0", "--metrics-port", "-1"]
    cmd += ["--session-snapshot", str(snapshot)]  # with the warm-up: a load of several seconds
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_line(log, "loading models from", process)
        time.sleep(0.5)  # into the load itself
        signalled = time.monotonic()
        process.send_signal(sig)
        code = process.wait(60)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    said = log.read_text()
    assert code == 0, said[-3000:]
    assert "stop requested while starting" in said
    assert "serving " not in said
    assert "Traceback" not in said
    assert took < 15, said[-3000:]
    assert snapshot.read_bytes() == b"sessions of the last run"


def test_settings_that_cannot_work_stop_the_start_before_loading(
    zoo_repository: Any, tmp_path: Path
) -> None:
    """Each of these used to be found only after every model had loaded and warmed up."""
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    port = str(free_port())
    for flags, said in [
        (["--token-file", str(tmp_path / "nope")], "cannot read token file"),
        (["--host", "no-such-host.invalid"], "cannot bind no-such-host.invalid:"),
        (["--port", port, "--metrics-port", port], f"cannot bind 127.0.0.1:{port}: address"),
        (
            ["--session-snapshot", str(tmp_path / "gone" / "s.bin")],
            f"folder {tmp_path / 'gone'} does not exist",
        ),
    ]:
        ran = subprocess.run(
            [RNNSERVE, "serve", "--model-dir", str(root), "--metrics-port", "-1", *flags],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
        assert ran.returncode == 1, ran.stderr[-2000:]
        assert said in ran.stderr, ran.stderr[-2000:]
        assert "Traceback" not in ran.stderr
        assert "loaded lstm_masked" not in ran.stderr
