"""Known traffic in, the exact metric values out."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import Client
from rnnserve.server.forward import bucket_length, bucket_rows

import zoo


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sample with exactly these labels; a missing series fails (it is not a zero)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        present = sorted(str(dict(lbl)) for n, lbl in samples if n == name)
        pytest.fail(f"no series {name}{labels}; {name} has {present or 'no series at all'}")
    return samples[key]


def test_scraped_metrics_match_the_traffic_exactly(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked", "gru_steps"], tmp_path / "models")
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.keras").write_bytes(b"not a keras file")
    server = serve(model_dir=str(root), warmup=False)
    rng = np.random.default_rng(0)
    lengths = [(3, 4), (12, 10), (7, 7), (20, 18), (16, 15)]  # close: always one batch
    with Client(server.target) as client:
        for a, b in lengths:  # one request, two sequences, one batch each (sent one at a time)
            client.predict("lstm_masked", [rng.normal(size=(n, zoo.D)) for n in (a, b)])
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                client.predict("lstm_masked", [np.ones((4, zoo.D + 2))])
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                client.predict("no_such_model", [np.ones((4, zoo.D))])
        with client.session("gru_steps") as session:
            for n in (5, 1, 8, 3):
                session.send(rng.normal(size=(n, zoo.D)))
        info = client.open_session("gru_steps")
        client.step(info.session_id, rng.normal(size=(6, zoo.D)))
        with pytest.raises(grpc.RpcError):
            client.step(info.session_id, rng.normal(size=(6, 1)))
        client.close_session(info.session_id)

    m = server.scrape()
    requests = "rnnserve_requests_total"
    lstm = {"model": "lstm_masked", "version": "1"}
    gru = {"model": "gru_steps", "version": "1"}
    assert value(m, requests, method="Predict", code="OK", **lstm) == 5
    assert value(m, requests, method="Predict", code="INVALID_ARGUMENT", **lstm) == 3
    assert value(m, requests, method="Predict", code="NOT_FOUND", model="_unknown", version="") == 2
    assert value(m, requests, method="Stream", code="OK", **gru) == 1
    assert value(m, requests, method="StreamChunk", code="OK", **gru) == 4
    assert value(m, requests, method="OpenSession", code="OK", **gru) == 1
    assert value(m, requests, method="StepSession", code="OK", **gru) == 1
    assert value(m, requests, method="StepSession", code="INVALID_ARGUMENT", **gru) == 1
    assert value(m, requests, method="CloseSession", code="OK", **gru) == 1
    duration = "rnnserve_request_duration_seconds_count"
    assert value(m, duration, model="lstm_masked", method="Predict") == 8

    # Compute: only valid sequences reach the model; each request made one batch of two.
    real = sum(a + b for a, b in lengths)
    padded = sum(2 * max(a, b) for a, b in lengths)
    assert value(m, "rnnserve_real_timesteps_total", **lstm) == real
    assert value(m, "rnnserve_padded_timesteps_total", **lstm) == padded
    assert value(m, "rnnserve_batch_size_count", **lstm) == 5
    assert value(m, "rnnserve_batch_size_sum", **lstm) == 10
    assert value(m, "rnnserve_batch_padded_timesteps_sum", **lstm) == padded
    # What the model ran: each batch as formed, or its XLA bucket once that is compiled.
    shapes = [(2 * max(ab), bucket_rows(2, 64) * bucket_length(max(ab))) for ab in lengths]
    computed = value(m, "rnnserve_computed_timesteps_total", **lstm)
    assert computed in {sum(choice) for choice in itertools.product(*shapes)}
    assert value(m, "rnnserve_queue_wait_seconds_count", **lstm) == 10
    assert value(m, "rnnserve_batch_compute_seconds_count", **lstm) == 5
    assert value(m, "rnnserve_real_timesteps_total", **gru) == 5 + 1 + 8 + 3 + 6
    assert value(m, "rnnserve_batch_size_count", **gru) == 5

    # State: nothing queued, sessions all closed, models' load state and failures.
    assert value(m, "rnnserve_queue_depth", **lstm) == 0
    assert value(m, "rnnserve_sessions_active") == 0
    assert value(m, "rnnserve_session_ends_total", reason="closed") == 2
    assert value(m, "rnnserve_model_state", state="ready", **lstm) == 1
    assert value(m, "rnnserve_model_state", state="ready", **gru) == 1
    assert value(m, "rnnserve_model_state", state="failed", model="broken", version="1") == 1
    assert value(m, "rnnserve_model_load_failures_total", model="broken") == 1
    assert value(m, "rnnserve_model_load_seconds", **lstm) > 0
    # The process and what it runs: memory, CPU, and the versions that decide the answers.
    assert value(m, "process_resident_memory_bytes") > 100e6  # TensorFlow alone is more
    assert value(m, "process_cpu_seconds_total") > 0
    [build] = [dict(labels) for name, labels in m if name == "rnnserve_build_info"]
    assert build["version"] == importlib.metadata.version("rnnserve")
    assert build["tensorflow"].startswith("2.")

    # Every series the shipped Grafana dashboard plots is one this server exports.
    dashboard = Path(__file__).resolve().parents[2] / "deploy/grafana/rnnserve-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"rnnserve_[a-z_]+", e)}
    exported = {name for name, _ in m}
    assert used, "dashboard plots nothing"
    assert used <= exported, f"dashboard uses unknown series {sorted(used - exported)}"


def test_event_loop_lag_shows_a_blocked_loop(serve: Any, tmp_path: Path) -> None:
    """A timer on the server's loop is sampled 4 times a second; blocking the loop for 0.6 s makes
    one sample at least 0.35 s late (the block minus at most one sampling interval)."""
    (tmp_path / "models").mkdir()
    server = serve(model_dir=str(tmp_path / "models"), warmup=False)

    def late(scraped: Any) -> float:
        return value(scraped, "rnnserve_event_loop_lag_seconds_count") - value(
            scraped, "rnnserve_event_loop_lag_seconds_bucket", le="0.25"
        )

    def scrape_until(condition: Any) -> Any:
        deadline = time.monotonic() + 30
        while not condition(scraped := server.scrape()):
            assert time.monotonic() < deadline, "no such sample within 30 s"
            time.sleep(0.1)
        return scraped

    before = scrape_until(lambda m: value(m, "rnnserve_event_loop_lag_seconds_count") >= 4)
    assert late(before) <= 1  # an idle loop is prompt (one stall of the machine allowed)

    server.loop.call_soon_threadsafe(time.sleep, 0.6)  # blocks the loop thread
    after = scrape_until(lambda m: late(m) > late(before))
    grown = value(after, "rnnserve_event_loop_lag_seconds_sum") - value(
        before, "rnnserve_event_loop_lag_seconds_sum"
    )
    # At least the block; at most the block and the waiting above (seconds, not milliseconds).
    assert 0.35 <= grown < 2.0, grown


def test_model_series_end_with_what_they_describe(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """A failed version whose directory is removed, an unloaded version's load time and a
    model's own config error: the first two used to stay on /metrics until a restart (an alert
    on them firing for ever), the third never showed."""
    root = tmp_path / "models"
    shutil.copytree(zoo_repository[0] / "lstm_masked" / "1", root / "m" / "1")
    server = serve(model_dir=str(root), poll_interval=0.2, warmup=False)
    state, load = "rnnserve_model_state", "rnnserve_model_load_seconds"

    def scrape_until(what: str, condition: Any) -> Any:
        deadline = time.monotonic() + 60
        while not condition(scraped := server.scrape()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)
        return scraped

    (root / "m" / "5").mkdir()
    (root / "m" / "5" / "model.keras").write_bytes(b"garbage")
    scrape_until("v5 failed", lambda m: m.get((state, _labels("5", "failed"))) == 1)
    shutil.rmtree(root / "m" / "5")
    scrape_until("v5 gone", lambda m: not _has(m, state, "5"))

    shutil.copytree(zoo_repository[0] / "lstm_masked" / "1", root / "m" / "2")  # 1 unloads
    m = scrape_until("v1 gone", lambda m: not _has(m, state, "1"))
    assert value(m, load, model="m", version="2") > 0
    assert not _has(m, load, "1")

    (root / "m" / "config.json").write_text("{ not json")
    m = scrape_until("config failed", lambda m: m.get((state, _labels("0", "failed"))) == 1)
    assert value(m, "rnnserve_model_load_failures_total", model="m") == 2  # v5, the config
    (root / "m" / "config.json").write_text("{}")
    scrape_until("config fixed", lambda m: not _has(m, state, "0"))


def _has(samples: Any, name: str, version: str) -> bool:
    return any(n == name and ("version", version) in labels for n, labels in samples)


def _labels(version: str, state: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"model": "m", "version": version, "state": state}.items()))
