"""Stateful sessions: long series streamed in chunks equal the model on the whole series; many
sessions share batches; sessions survive a graceful restart; eviction and misuse are visible."""

from __future__ import annotations

import asyncio
import functools
import shutil
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client, StepResult

import zoo
from conftest import RunningServer

CAUSAL = [a for a in zoo.ARCHITECTURES if a.causal]
STEPS = 2000
ATOL = 1e-5


def _chunks(x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    cuts, at = [], 0
    while at < len(x):
        size = int(rng.integers(1, 101))
        cuts.append(x[at : at + size])
        at += size
    return cuts


def _joined(results: list[StepResult]) -> list[np.ndarray]:
    """Per-step rows of every output, over all chunks."""
    names = list(results[0].outputs)
    return [np.concatenate([r.outputs[n].steps for r in results]) for n in names]


def _check_stream(results: list[StepResult], want: list[np.ndarray], where: str) -> None:
    got = _joined(results)
    for out, (g, w) in enumerate(zip(got, want, strict=True)):
        if w.ndim == g.ndim:  # per-step head: every step
            np.testing.assert_allclose(g, w, rtol=0, atol=ATOL, err_msg=f"{where} output {out}")
        else:  # many-to-one head: its last step is the answer for the whole series
            np.testing.assert_allclose(g[-1], w, rtol=0, atol=ATOL, err_msg=f"{where} output {out}")
        last = results[-1].outputs[list(results[-1].outputs)[out]].sequence
        w_last = w[-1] if w.ndim == g.ndim else w
        np.testing.assert_allclose(last, w_last, rtol=0, atol=ATOL, err_msg=f"{where} so far")


async def _stream(client: AsyncClient, model: str, chunks: list[np.ndarray]) -> list[StepResult]:
    async with client.session(model) as session:
        return [await session.send(c) for c in chunks]


@functools.cache
def _series(name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 2,000-step series for this architecture and `model(x)` on the whole of it."""
    arch = zoo.BY_NAME[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = zoo.sequences(arch, [STEPS], rng)[0]
    return x, zoo.Reference(_MODELS[name])(x)


_MODELS: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _models(zoo_repository: Any) -> None:
    _MODELS.update(zoo_repository[1])


@pytest.mark.parametrize("arch", CAUSAL, ids=lambda a: a.name)
def test_a_long_series_in_random_chunks_equals_the_whole(arch: zoo.Arch, zoo_server: Any) -> None:
    x, want = _series(arch.name)
    chunks = _chunks(x, np.random.default_rng(1))

    async def main() -> list[StepResult]:
        async with AsyncClient(zoo_server.target, timeout=600) as client:
            return await _stream(client, arch.name, chunks)

    results = asyncio.run(main())
    assert results[-1].total_steps == STEPS
    _check_stream(results, want, arch.name)


def test_two_hundred_sessions_at_once_share_batches_and_stay_exact(zoo_server: Any) -> None:
    """200 sessions spread over every causal architecture, each cutting its model's series at
    random, all streaming at once: chunks of different sessions share batches."""
    rng = np.random.default_rng(2)
    plans = [
        (CAUSAL[i % len(CAUSAL)].name, _chunks(_series(CAUSAL[i % len(CAUSAL)].name)[0], rng))
        for i in range(200)
    ]
    before = {a.name: zoo_server.batcher_stats(a.name) for a in CAUSAL}
    before = {name: (stats.rows, stats.batches) for name, stats in before.items()}

    async def main() -> list[list[StepResult]]:
        async with AsyncClient(zoo_server.target, timeout=600) as client:
            return await asyncio.gather(*(_stream(client, name, c) for name, c in plans))

    streams = asyncio.run(main())
    for arch in CAUSAL:
        after = zoo_server.batcher_stats(arch.name)
        chunks = after.rows - before[arch.name][0]
        batches = after.batches - before[arch.name][1]
        assert chunks == sum(len(c) for name, c in plans if name == arch.name)
        assert batches < chunks / 3, f"{arch.name}: {chunks} chunks in {batches} batches"
    for i, ((name, _), results) in enumerate(zip(plans, streams, strict=True)):
        assert results[-1].total_steps == STEPS
        _check_stream(results, _series(name)[1], f"session {i} ({name})")


def test_sessions_survive_a_graceful_restart(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """Every causal architecture: stream half, restart the server, resume by id, stream the rest."""
    root = zoo.subset(zoo_repository[0], [a.name for a in CAUSAL], tmp_path / "models")
    snapshot = tmp_path / "sessions.bin"
    rng = np.random.default_rng(3)
    work = {a.name: _chunks(_series(a.name)[0], rng) for a in CAUSAL}
    halves = {name: len(chunks) // 2 for name, chunks in work.items()}
    server = serve(model_dir=str(root), session_snapshot=str(snapshot), warmup=False)
    ids: dict[str, str] = {}
    firsts: dict[str, list[StepResult]] = {}
    with Client(server.target) as client:
        for name, chunks in work.items():
            session = client.session(name)
            firsts[name] = [session.send(c) for c in chunks[: halves[name]]]
            ids[name] = session.detach()
    server.stop()
    assert snapshot.stat().st_size > 0
    server = serve(model_dir=str(root), session_snapshot=str(snapshot), warmup=False)
    with Client(server.target) as client:
        for name, chunks in work.items():
            with client.session(session_id=ids[name]) as session:
                assert session.steps == sum(len(c) for c in chunks[: halves[name]])
                rest = [session.send(c) for c in chunks[halves[name] :]]
            _check_stream(firsts[name] + rest, _series(name)[1], name)


def test_non_causal_models_cannot_stream(zoo_server: Any) -> None:
    with Client(zoo_server.target) as client:
        for name in ("bidirectional", "backwards", "pooled"):
            assert not client.metadata(name).can_stream
            with pytest.raises(grpc.RpcError) as err:
                client.open_session(name)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"model {name} version 1 cannot stream" in err.value.details()
        assert client.metadata("lstm_masked").can_stream
        assert client.metadata("stateful").can_stream  # trained stateful, served stateless


def test_unary_steps_out_of_order_and_unknown_sessions(zoo_server: Any) -> None:
    x = np.random.default_rng(0).normal(size=(30, zoo.D)).astype(np.float32)
    with Client(zoo_server.target) as client:
        info = client.open_session("gru_steps")
        first = client.step(info.session_id, x[:10], offset=0)
        assert first.total_steps == 10
        with pytest.raises(grpc.RpcError) as err:
            client.step(info.session_id, x[10:20], offset=20)  # a chunk skipped
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "starts at offset 20 but the session has consumed 10" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.step(info.session_id, x[10:20, :3], offset=10)  # bad chunk: nothing applied
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        second = client.step(info.session_id, x[10:30], offset=10)
        assert second.total_steps == 30
        with pytest.raises(grpc.RpcError) as err:
            client.step("feedfacefeedface", x[:3])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "session feedfacefeedface not found" in err.value.details()
        client.close_session(info.session_id)
        with pytest.raises(grpc.RpcError) as err:
            client.step(info.session_id, x[:3])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "was closed" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.open_session("gru_steps", session_id="bad id!")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_idle_sessions_expire_visibly(serve: Any, zoo_repository: Any, tmp_path: Path) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    # A TTL long enough that opening and the first step cannot be that far apart on a busy
    # machine, short enough for a test.
    server = serve(model_dir=str(root), session_ttl=2, warmup=False)
    x = np.ones((4, zoo.D), np.float32)
    with Client(server.target) as client:
        info = client.open_session("lstm_masked")
        client.step(info.session_id, x)
        deadline = time.monotonic() + 60
        while server.call(lambda: server.server.store.peek(info.session_id)) is not None:
            assert time.monotonic() < deadline, "the idle session did not expire"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            client.step(info.session_id, x)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "expired after 2s idle" in err.value.details()
    metrics = _scrape(server.metrics_url)
    assert 'rnnserve_session_ends_total{reason="expired"} 1.0' in metrics
    assert "rnnserve_sessions_active 0.0" in metrics


def test_max_sessions_evicts_least_recently_used_or_refuses(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    x = np.ones((2, zoo.D), np.float32)
    server = serve(model_dir=str(root), max_sessions=3, warmup=False)
    with Client(server.target) as client:
        ids = [client.open_session("lstm_masked").session_id for _ in range(3)]
        client.step(ids[0], x)  # ids[1] is now the least recently used
        newest = client.open_session("lstm_masked").session_id
        with pytest.raises(grpc.RpcError) as err:
            client.step(ids[1], x)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "evicted: the server holds at most 3 sessions" in err.value.details()
        for kept in (ids[0], ids[2], newest):
            client.step(kept, x)
    assert 'rnnserve_session_ends_total{reason="lru"} 1.0' in _scrape(server.metrics_url)
    server = serve(model_dir=str(root), max_sessions=2, session_overflow="refuse", warmup=False)
    with Client(server.target) as client:
        client.open_session("lstm_masked")
        client.open_session("lstm_masked")
        with pytest.raises(grpc.RpcError) as err:
            client.open_session("lstm_masked")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many sessions (2 open)" in err.value.details()


def test_export_and_import_move_a_session(zoo_server: Any, zoo_repository: Any) -> None:
    model = zoo_repository[1]["multi_output"]
    x = np.random.default_rng(5).normal(size=(120, zoo.D)).astype(np.float32)
    with Client(zoo_server.target) as client:
        info = client.open_session("multi_output")
        first = client.step(info.session_id, x[:70])
        state = client.export_session(info.session_id, remove=True)
        assert state.steps == 70
        with pytest.raises(grpc.RpcError) as err:
            client.step(info.session_id, x[70:])  # removed from this server
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"session {info.session_id} was closed" in (err.value.details() or "")
        moved = client.import_session(state)
        assert moved.session_id == info.session_id
        assert moved.steps == 70
        second = client.step(moved.session_id, x[70:], offset=70)
        with pytest.raises(grpc.RpcError) as err:
            client.import_session(state)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        bad = type(state)()
        bad.CopyFrom(state)
        bad.session_id = "other"
        del bad.states[0]
        with pytest.raises(grpc.RpcError) as err:
            client.import_session(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs state tensors of sizes" in err.value.details()
    _check_stream([first, second], zoo.Reference(model)(x), "moved session")


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_a_causal_model_without_recurrent_layers_streams_with_no_state(
    serve: Any, tmp_path: Path
) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None, zoo.D)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    (tmp_path / "per_step" / "1").mkdir(parents=True)
    model.save(tmp_path / "per_step" / "1" / "model.keras")
    server = serve(model_dir=str(tmp_path), warmup=False)
    x = np.random.default_rng(3).normal(size=(40, zoo.D)).astype(np.float32)
    with Client(server.target) as client:
        assert client.metadata("per_step").can_stream
        with client.session("per_step") as session:
            results = [session.send(c) for c in (x[:7], x[7:8], x[8:40])]
    got = _joined(results)[0]
    want = np.asarray(model(x[None]))[0]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert results[-1].total_steps == 40


def _serving_one_session(serve: Any, root: Path, snapshot: Path) -> tuple[RunningServer, Any]:
    """A server of `root` saving sessions to `snapshot`, with one gru_steps session 4 steps in."""
    server = serve(model_dir=str(root), session_snapshot=str(snapshot), warmup=False)
    with Client(server.target) as client:
        session = client.open_session("gru_steps")
        client.step(session.session_id, np.ones((4, zoo.D), np.float32))
    return server, session


def test_sessions_of_a_version_not_served_after_a_restart_are_kept_aside(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """A rollout replaces version 1 by 2 across a restart: the snapshot's version-1 sessions
    cannot be restored, so they go to `<snapshot>.unrestored` instead of being lost, and a server
    that has version 1 again restores them from there."""
    root = zoo.subset(zoo_repository[0], ["gru_steps"], tmp_path / "models")
    model = root / "gru_steps"
    snapshot = tmp_path / "sessions.bin"
    aside = tmp_path / "sessions.bin.unrestored"
    server, session = _serving_one_session(serve, root, snapshot)
    server.stop()
    shutil.move(model / "1", model / "2")
    server = serve(model_dir=str(root), session_snapshot=str(snapshot), warmup=False)
    assert aside.stat().st_size > 0
    with Client(server.target) as client, pytest.raises(grpc.RpcError) as err:
        client.step(session.session_id, np.ones((2, zoo.D), np.float32), offset=4)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    server.stop()
    shutil.move(model / "2", model / "1")
    server = serve(model_dir=str(root), session_snapshot=str(aside), warmup=False)
    assert not aside.exists()  # restored and serving: retired
    with Client(server.target) as client:
        step = client.step(session.session_id, np.ones((2, zoo.D), np.float32), offset=4)
        assert step.total_steps == 6


def test_restoring_into_fewer_sessions_keeps_the_rest_aside(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    """A restart with a smaller `--max-sessions` than the snapshot holds: the sessions beyond
    it go to `<snapshot>.unrestored` (evicting would have lost the ones restored first), and a
    server with room restores them from there."""
    root = zoo.subset(zoo_repository[0], ["gru_steps"], tmp_path / "models")
    snapshot = tmp_path / "sessions.bin"
    aside = tmp_path / "sessions.bin.unrestored"
    server = serve(model_dir=str(root), session_snapshot=str(snapshot), warmup=False)
    with Client(server.target) as client:
        ids = [client.open_session("gru_steps").session_id for _ in range(3)]
        for session_id in ids:
            client.step(session_id, np.ones((4, zoo.D), np.float32))
    server.stop()
    server = serve(
        model_dir=str(root), session_snapshot=str(snapshot), max_sessions=2, warmup=False
    )
    assert aside.stat().st_size > 0
    with Client(server.target) as client:
        answered = []
        for session_id in ids:
            try:
                client.step(session_id, np.ones((1, zoo.D), np.float32), offset=4)
                answered.append(session_id)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        assert len(answered) == 2, answered  # none of them evicted by the third
    server.stop()
    server = serve(model_dir=str(root), session_snapshot=str(aside), warmup=False)
    [kept] = [i for i in ids if i not in answered]
    with Client(server.target) as client:
        assert client.step(kept, np.ones((2, zoo.D), np.float32), offset=4).total_steps == 6


def test_a_snapshot_that_cannot_be_written_does_not_stop_the_shutdown(
    serve: Any, zoo_repository: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = zoo.subset(zoo_repository[0], ["gru_steps"], tmp_path / "models")
    snapshot = tmp_path / "gone-by-then" / "sessions.bin"
    snapshot.parent.mkdir()  # (a missing folder stops the start)
    server, _ = _serving_one_session(serve, root, snapshot)
    ports = (server.server.port, server.server.metrics_port)
    snapshot.parent.rmdir()  # an unmounted volume, say
    server.stop()
    assert "could not save sessions" in caplog.text
    for port in ports:  # the rest of the shutdown ran: both ports are free again
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # fails only if listened on
            probe.bind(("127.0.0.1", port))


def test_a_restart_that_fails_keeps_the_snapshot(
    serve: Any, zoo_repository: Any, tmp_path: Path
) -> None:
    root = zoo.subset(zoo_repository[0], ["gru_steps"], tmp_path / "models")
    snapshot = tmp_path / "sessions.bin"
    server, session = _serving_one_session(serve, root, snapshot)
    server.stop()
    saved = snapshot.read_bytes()
    with socket.socket() as taken:  # the metrics port is busy (the old process still has it)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        failing = RunningServer(
            model_dir=str(root),
            session_snapshot=str(snapshot),
            warmup=False,
            metrics_port=taken.getsockname()[1],
        )
        with pytest.raises(OSError, match=r"cannot serve metrics on .* in use"):
            failing.__enter__()
        # Not `stop()`: it would save the sessions again. The failed start closed its gRPC port.
        assert failing.server._grpc is None
        failing.loop.call_soon_threadsafe(failing.loop.stop)
    assert snapshot.read_bytes() == saved  # nothing was served: the sessions are still there
    server = serve(model_dir=str(root), session_snapshot=str(snapshot), warmup=False)
    assert not snapshot.exists()  # restored and serving: retired
    with Client(server.target) as client:
        step = client.step(session.session_id, np.ones((2, zoo.D), np.float32), offset=4)
        assert step.total_steps == 6


@pytest.mark.parametrize("name", ["lstm_masked", "embedding_masked"])
def test_chunks_that_start_masked_answer_as_the_whole_run_so_far(
    name: str, zoo_server: Any
) -> None:
    """Chunks that start with masked steps (zero frames, token 0), one of them all masked: after
    every chunk the answer so far equals `model(x)` on the series up to there (the server
    answered zeros for an all-masked chunk: an RNN repeats its previous output at a masked step,
    which Keras starts at zero in every call)."""
    arch = zoo.BY_NAME[name]
    x = zoo.sequences(arch, [16], np.random.default_rng(7))[0]
    x[x == 0] = 1  # masked exactly where this test says
    x[5:7] = 0
    x[9] = 0
    reference = zoo.Reference(_MODELS[name])
    with Client(zoo_server.target) as client, client.session(name) as session:
        for start, end in ((0, 5), (5, 7), (7, 9), (9, 16)):
            result = session.send(x[start:end])
            [want] = reference(x[:end])
            np.testing.assert_allclose(
                result.output.sequence, want, rtol=0, atol=ATOL, err_msg=f"after step {end}"
            )
