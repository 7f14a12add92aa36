"""Model versions under continuous load: a new version takes over with no failed request, a broken
one is reported and changes nothing, a removed one unloads after its pinned sessions end."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import Client
from rnnserve.v1 import inference_pb2 as pb

import zoo


def _wait(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Load:
    """Clients sending Predict (latest version) in a loop; every answer and failure is counted."""

    def __init__(self, target: str, model: str, threads: int = 4) -> None:
        self.versions: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(target, model, i), daemon=True)
            for i in range(threads)
        ]

    def _run(self, target: str, model: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(target, timeout=30) as client:
            while not self._stop.is_set():
                x = rng.normal(size=(int(rng.integers(1, 40)), zoo.D)).astype(np.float32)
                request = pb.PredictRequest(model_name=model)
                request.sequences.add().CopyFrom(_tensor(x))
                try:
                    response = client.stub.Predict(request, timeout=30)
                except grpc.RpcError as err:
                    with self._lock:
                        self.failures.append(f"{err.code().name}: {err.details()}")
                    continue
                with self._lock:
                    self.versions[response.model_version] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def _tensor(x: np.ndarray) -> pb.Tensor:
    from rnnserve.client.tensors import to_tensor

    return to_tensor(x)


def _states(client: Client, model: str) -> dict[int, tuple[str, str]]:
    for summary in client.list_models().models:
        if summary.name == model:
            return {
                v.version: (pb.ModelState.Name(v.state).removeprefix("MODEL_STATE_"), v.error)
                for v in summary.versions
            }
    return {}


def test_new_version_takes_over_and_broken_one_changes_nothing(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    source = zoo_repository[0]
    root = tmp_path / "models"
    shutil.copytree(source / "lstm_masked" / "1", root / "m" / "1")
    # With the start-up warm-up (the default): each new version compiles before it takes over.
    server = serve(model_dir=str(root), poll_interval=0.2)
    with Client(server.target) as client, Load(server.target, "m") as load:
        _wait("traffic on v1", lambda: load.versions[1] > 20)
        shutil.copytree(source / "collapse_then_dense" / "1", root / "m" / "2")
        _wait("traffic on v2", lambda: load.versions[2] > 20)
        _wait("v1 unloaded", lambda: set(_states(client, "m")) == {2})
        assert client.metadata("m").versions == (2,)

        bad = root / "m" / "3"
        bad.mkdir()
        (bad / "model.keras").write_bytes(b"truncated upload")
        _wait("v3 reported", lambda: _states(client, "m").get(3, ("",))[0] == "FAILED")
        assert "model.keras is not a .keras archive" in _states(client, "m")[3][1]  # not "found"
        served_before = load.versions[2]
        _wait("v2 still serving", lambda: load.versions[2] > served_before + 20)
        assert _states(client, "m")[2][0] == "READY"

        # The broken version is fixed in place: it is retried and takes over.
        shutil.rmtree(bad)
        shutil.copytree(source / "lstm_masked" / "1", bad)
        _wait("traffic on v3", lambda: load.versions[3] > 20)
    assert load.failures == []


def test_removed_version_drains_until_its_sessions_end(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    source = zoo_repository[0]
    root = tmp_path / "models"
    for version, arch in ((1, "lstm_masked"), (2, "collapse_then_dense")):
        shutil.copytree(source / arch / "1", root / "m" / str(version))
    (root / "m" / "config.json").write_text(json.dumps({"version_policy": {"all": True}}))
    server = serve(model_dir=str(root), poll_interval=0.2, warmup=False)
    x = np.ones((5, zoo.D), np.float32)
    with Client(server.target) as client:
        assert client.metadata("m").versions == (1, 2)
        pinned = client.open_session("m", version=1)
        client.step(pinned.session_id, x)
        with Load(server.target, "m") as load:
            shutil.rmtree(root / "m" / "1")
            _wait("v1 draining", lambda: _states(client, "m").get(1, ("",))[0] == "DRAINING")
            with pytest.raises(grpc.RpcError) as err:  # no new work for a leaving version
                client.predict("m", [x], version=1)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert client.step(pinned.session_id, x).total_steps == 10  # its session goes on
            time.sleep(1.0)
            assert 1 in _states(client, "m")  # still held for the session
            client.close_session(pinned.session_id)
            _wait("v1 unloaded", lambda: 1 not in _states(client, "m"))
        assert load.failures == []
        assert set(load.versions) == {2}


def test_a_broken_model_config_keeps_what_the_model_serves(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """A model's config.json that does not parse (here: not even UTF-8) is reported; the model
    keeps serving the versions it had, loads no new one until the file is fixed, and the
    repository keeps being watched."""
    source = zoo_repository[0]
    root = tmp_path / "models"
    shutil.copytree(source / "lstm_masked" / "1", root / "m" / "1")
    server = serve(model_dir=str(root), poll_interval=0.2, warmup=False)
    config = root / "m" / "config.json"
    with Client(server.target) as client, Load(server.target, "m") as load:
        _wait("traffic on v1", lambda: load.versions[1] > 20)
        config.write_bytes(b"\xff\xfe{ not json")
        _wait(
            "config reported", lambda: "not valid JSON" in _states(client, "m").get(0, ("", ""))[1]
        )
        shutil.copytree(source / "collapse_then_dense" / "1", root / "m" / "2")
        # Another model added now: once it serves, a scan has seen m's version 2 too.
        shutil.copytree(source / "lstm_masked" / "1", root / "other" / "1")
        _wait("a later scan", lambda: _states(client, "other").get(1, ("",))[0] == "READY")
        assert _states(client, "m")[1][0] == "READY"
        assert 2 not in _states(client, "m")
        served_before = load.versions[1]
        _wait("v1 still serving", lambda: load.versions[1] > served_before + 20)

        config.write_text("{}")
        _wait("traffic on v2", lambda: load.versions[2] > 20)
        assert 0 not in _states(client, "m")
    assert load.failures == []


def test_a_version_that_failed_on_the_model_config_is_retried_when_it_is_fixed(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(zoo_repository[0] / "lstm_masked" / "1", root / "m" / "1")
    config = root / "m" / "config.json"
    config.write_text(json.dumps({"max_length": 0}))  # read when a version loads
    server = serve(model_dir=str(root), poll_interval=0.2, warmup=False)
    with Client(server.target) as client:
        assert "max_length" in _states(client, "m")[1][1]
        config.write_text(json.dumps({"max_length": 50}))
        _wait("v1 loaded", lambda: _states(client, "m").get(1, ("",))[0] == "READY")
        assert client.metadata("m").max_length == 50


def test_the_server_is_serving_only_while_some_model_is_ready(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """Health `""` (what `rnnserve health` and the container's check ask): a server whose
    repository holds no loadable model answers nothing useful, so it is NOT_SERVING until a
    model loads, and again once the last one is gone (it used to say SERVING throughout)."""
    root = tmp_path / "models"
    root.mkdir()
    server = serve(model_dir=str(root), poll_interval=0.2, warmup=False)
    with Client(server.target) as client:

        def model_serving() -> bool:
            try:
                return client.health("lstm_masked")
            except grpc.RpcError as err:  # NOT_FOUND: a model the server never had
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False

        assert client.health() is False
        zoo.subset(zoo_repository[0], ["lstm_masked"], root)
        _wait("the model to load", model_serving)
        assert client.health() is True
        (root / "lstm_masked").unlink()  # a link into the test repository
        _wait("the model to unload", lambda: not model_serving())
        assert client.health() is False


def test_a_rollback_serves_the_version_its_sessions_kept_loaded(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """v1 drains when v2 arrives but stays loaded for its session; v2 is then removed (a
    rollback): v1 serves again at once (it stayed DRAINING, so the model answered NOT_FOUND
    until its last session ended)."""
    source = zoo_repository[0]
    root = tmp_path / "models"
    shutil.copytree(source / "lstm_masked" / "1", root / "m" / "1")
    server = serve(model_dir=str(root), poll_interval=0.2, warmup=False)
    x = np.ones((5, zoo.D), np.float32)
    with Client(server.target) as client:
        pinned = client.open_session("m")
        shutil.copytree(source / "lstm_masked" / "1", root / "m" / "2")
        _wait("v1 draining", lambda: _states(client, "m").get(1, ("",))[0] == "DRAINING")
        shutil.rmtree(root / "m" / "2")
        _wait("v2 gone", lambda: 2 not in _states(client, "m"))
        _wait("v1 serving", lambda: _states(client, "m").get(1, ("",))[0] == "READY", 10)
        assert client.predict("m", [x])[0].length == 5
        assert client.health("m")
        assert client.health()
        assert client.step(pinned.session_id, x).total_steps == 5


def test_a_version_policy_naming_only_absent_versions_keeps_what_serves(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """A typo in `versions` used to drain and unload every version without a word."""
    root = tmp_path / "models"
    shutil.copytree(zoo_repository[0] / "lstm_masked" / "1", root / "m" / "1")
    server = serve(model_dir=str(root), poll_interval=0.2, warmup=False)
    config = root / "m" / "config.json"
    x = np.ones((5, zoo.D), np.float32)
    with Client(server.target) as client:
        config.write_text(json.dumps({"version_policy": {"versions": [9]}}))
        _wait("policy reported", lambda: "[9]" in _states(client, "m").get(0, ("", ""))[1])
        assert _states(client, "m")[0] == (
            "FAILED",
            "version_policy names versions [9] that are not in the repository (found [1])",
        )
        time.sleep(1.0)  # several scans
        assert _states(client, "m")[1][0] == "READY"
        assert client.predict("m", [x])[0].length == 5
        config.write_text(json.dumps({"version_policy": {"versions": [1]}}))
        _wait("error cleared", lambda: 0 not in _states(client, "m"))
        assert _states(client, "m")[1][0] == "READY"
