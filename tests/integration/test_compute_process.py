"""`--compute-process`: batches computed in a child process give the same answers (the invariant,
on mixed lengths and across a stacked and a Bidirectional model, and sessions' states through the
pipe); a child that dies costs no request, and later batches run in the serving process; an
unloaded version's child ends with it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client

import zoo

MODELS = ["lstm_masked", "stacked_norm_steps", "bidirectional"]
ATOL = 1e-5


def _children(server: Any) -> dict[str, Any]:
    def collect() -> dict[str, Any]:
        return {m.name: m.batcher._executor for m in server.server.repository.served()}

    return server.call(collect)


async def _predict(target: str, model: str, xs: list[np.ndarray]) -> list[Any]:
    async with AsyncClient(target, timeout=120) as client:
        done = await asyncio.gather(*(client.predict(model, [x]) for x in xs))
    return [p for batch in done for p in batch]


def _check(predictions: list[Any], xs: list[np.ndarray], reference: Any) -> None:
    """Default output mode: per-step heads answer per step, the others per sequence."""
    assert len(predictions) == len(xs)
    for x, p in zip(xs, predictions, strict=True):
        assert p.length == len(x)
        for out, want in zip(p.outputs.values(), reference(x), strict=True):
            got = out.steps if out.steps is not None else out.sequence
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def computed(zoo_repository: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import RunningServer

    root = zoo.subset(zoo_repository[0], MODELS, tmp_path_factory.mktemp("cp") / "models")
    with RunningServer(model_dir=str(root), warmup=False, compute_process=True) as server:
        yield server


@pytest.mark.parametrize("name", MODELS)
def test_answers_computed_in_the_child_equal_the_model_alone(
    name: str, computed: Any, zoo_repository: Any
) -> None:
    arch = zoo.BY_NAME[name]
    children = _children(computed)
    assert children[name].alive, "the model's batches are not computed in a child"
    rng = np.random.default_rng(7)
    lengths = rng.choice([1, 2, 5, 13, 40, 90, 150], size=60).tolist()
    xs = zoo.sequences(arch, lengths, rng)
    before = computed.batcher_stats(name).batches
    predictions = asyncio.run(_predict(computed.target, name, xs))
    assert computed.batcher_stats(name).batches - before < len(xs)  # batches were shared
    _check(predictions, xs, zoo.Reference(zoo_repository[1][name]))
    meta = Client(computed.target).metadata(name)
    assert "batches computed in a child process" in meta.notes


def test_sessions_carry_their_state_through_the_child(computed: Any, zoo_repository: Any) -> None:
    arch = zoo.BY_NAME["lstm_masked"]
    x = zoo.sequences(arch, [120], np.random.default_rng(3))[0]
    want = zoo.Reference(zoo_repository[1]["lstm_masked"])(x)[0]  # the whole run at once
    with Client(computed.target) as client, client.session("lstm_masked") as session:
        for part in np.array_split(x, 4):
            last = session.send(part)
    np.testing.assert_allclose(last.output.sequence, want, atol=ATOL, rtol=0)


def test_a_child_that_dies_costs_no_request(computed: Any, zoo_repository: Any) -> None:
    """Killed while requests keep coming: every request is answered, and right; from then on
    batches run in the serving process."""
    name = "stacked_norm_steps"
    child = _children(computed)[name]
    assert child.alive
    arch = zoo.BY_NAME[name]
    rng = np.random.default_rng(11)
    xs = zoo.sequences(arch, rng.choice([3, 30, 80], size=200).tolist(), rng)

    async def run() -> list[Any]:
        task = asyncio.ensure_future(_predict(computed.target, name, xs))
        await asyncio.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        return await task

    predictions = asyncio.run(run())
    deadline = time.monotonic() + 10
    while child.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.alive
    _check(predictions, xs, zoo.Reference(zoo_repository[1][name]))
    again = asyncio.run(_predict(computed.target, name, xs[:5]))
    _check(again, xs[:5], zoo.Reference(zoo_repository[1][name]))


def test_the_child_ends_with_its_server(zoo_repository: Any, tmp_path: Path) -> None:
    from conftest import RunningServer

    root = zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "models")
    with RunningServer(model_dir=str(root), warmup=False, compute_process=True) as server:
        pid = _children(server)["lstm_masked"].pid
        os.kill(pid, 0)  # running
    assert _gone_within(pid, 10), f"compute process {pid} outlived its server"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
