"""The shipped models: each test split, sent through a real server with the real client, gives the
same predictions as the model called directly, and at least the accuracy its card states."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from rnnserve.client import AsyncClient, Client
from rnnserve.server.cli import main

from conftest import RunningServer

MODELS = Path(__file__).resolve().parents[2] / "models"
ATOL = 1e-5


def recipe(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", MODELS / name / "recipe.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def card_accuracy(name: str) -> float:
    return float(json.loads((MODELS / name / "1" / "metrics.json").read_text())["test_accuracy"])


def direct(model: keras.Model) -> Any:
    """`model(x)` on one unpadded sequence: one trace with a free time dimension (these models
    have no TimeDistributed layer, the one Keras layer that trace would break)."""
    assert not any(isinstance(layer, keras.layers.TimeDistributed) for layer in model.layers)
    fn = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([1, None, model.inputs[0].shape[-1]], tf.float32)],
    )
    return lambda x: np.asarray(fn(x[None]))[0]


@pytest.fixture(scope="module")
def shipped() -> Any:
    # No XLA warm-up: what is tested is the answers, not the first request's latency.
    with RunningServer(model_dir=str(MODELS), warmup=False) as server:
        yield server


async def _predict_all(target: str, model: str, xs: list[np.ndarray], output: str) -> list[Any]:
    async with AsyncClient(target, timeout=600) as client:
        groups = [
            client.predict(model, xs[i : i + 16], output=output) for i in range(0, len(xs), 16)
        ]
        return [p for group in await asyncio.gather(*groups) for p in group]


@pytest.mark.parametrize("name", ["japanese_vowels", "plaid"])
def test_sequence_classifier_matches_the_model_and_its_card(name: str, shipped: Any) -> None:
    xs, labels = recipe(name).load_test_split()
    predictions = asyncio.run(_predict_all(shipped.target, name, xs, "sequence"))
    model = keras.saving.load_model(MODELS / name / "1" / "model.keras")
    call = direct(model)
    served, alone = [], []
    for x, p in zip(xs, predictions, strict=True):
        want = call(x)
        np.testing.assert_allclose(p.output.sequence, want, atol=ATOL, rtol=0)
        served.append(int(np.argmax(p.output.sequence)))
        alone.append(int(np.argmax(want)))
    assert served == alone
    accuracy = float(np.mean(np.asarray(served) == labels))
    assert accuracy >= card_accuracy(name) - 5e-5, f"{name}: {accuracy} below the card"
    info = Client(shipped.target).metadata(name)
    assert info.can_stream
    assert info.outputs[0].labels[int(labels[0])]


def test_streaming_model_per_frame_tags_match_the_model_and_its_card(shipped: Any) -> None:
    name = "vowels_stream"
    streams, tags = recipe(name).load_test_split()
    predictions = asyncio.run(_predict_all(shipped.target, name, streams, "steps"))
    model = keras.saving.load_model(MODELS / name / "1" / "model.keras")
    head = model.layers[-1]
    assert isinstance(head, keras.layers.TimeDistributed)
    # The model called directly: its own layers up to the head in one trace, then its own head's
    # layer over every frame (what TimeDistributed(Dense) computes, without Keras' traced
    # TimeDistributed, which mixes up batch and time when time is unknown).
    body = keras.Model(model.inputs, model.layers[-2].output)
    body_fn = tf.function(
        lambda x: body(x, training=False),
        input_signature=[tf.TensorSpec([1, None, 12], tf.float32)],
    )
    correct = total = 0
    for i, (x, y, p) in enumerate(zip(streams, tags, predictions, strict=True)):
        want = np.asarray(head.layer(body_fn(x[None])))[0]
        np.testing.assert_allclose(p.output.steps, want, atol=ATOL, rtol=0, err_msg=f"stream {i}")
        assert np.array_equal(p.output.step_classes, np.argmax(want, axis=1))
        correct += int(np.sum(p.output.step_classes == y))
        total += len(y)
    shortest = min(range(len(streams)), key=lambda i: len(streams[i]))
    eager = np.asarray(model(streams[shortest][None]))[0]  # plain eager model(x), the definition
    np.testing.assert_allclose(predictions[shortest].output.steps, eager, atol=ATOL, rtol=0)
    assert correct / total >= card_accuracy(name) - 5e-5

    # The same stream through a session, in uneven chunks, gives the same tags.
    x = streams[shortest]
    rng = np.random.default_rng(0)
    got = []
    with Client(shipped.target) as client, client.session(name) as session:
        at = 0
        while at < len(x):
            size = int(rng.integers(1, 120))
            got.append(session.send(x[at : at + size]).output.steps)
            at += size
    np.testing.assert_allclose(np.concatenate(got), eager, atol=ATOL, rtol=0)


def test_the_command_line_names_each_frames_class(
    shipped: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rnnserve predict` of a per-frame model printed only the raw per-step scores."""
    streams, _ = recipe("vowels_stream").load_test_split()
    x = streams[0][:7]
    np.save(tmp_path / "frames.npy", x)
    argv = ["predict", "vowels_stream", str(tmp_path / "frames.npy"), "--target", shipped.target]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)["speaker"]
    want = Client(shipped.target).predict("vowels_stream", [x])[0].output.step_classes
    assert printed["step_classes"] == want.tolist()
    labels = Client(shipped.target).metadata("vowels_stream").outputs[0].labels
    assert printed["step_labels"] == [labels[c] for c in want]
