"""Which outputs a response carries, checked against `model(x)` alone: outputs chosen by name, each
output mode, top-k (order, scores, labels) and per-step classes, for a model with a per-step head
and a per-sequence head, and a many-to-one model whose per-step values exist because it is causal.
Also: a multi-sequence request with one bad sequence fails as a whole, naming which one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import Client

import zoo

ATOL = 1e-5
TAGS = ("noun", "verb", "other")
LABELS = ("no", "yes")


@pytest.fixture(scope="module")
def labelled(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any]]:
    """multi_output (per-step `tags`, per-sequence `label`) and lstm_masked, with labels."""
    root = tmp_path_factory.mktemp("labelled")
    models = zoo.write_repository(root, ["multi_output", "lstm_masked"])
    (root / "multi_output" / "1" / "config.json").write_text(
        json.dumps({"outputs": {"tags": {"labels": TAGS}, "label": {"labels": LABELS}}})
    )
    return root, models


def _xs(lengths: list[int], seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, zoo.D)).astype(np.float32) for n in lengths]


def test_outputs_modes_top_k_and_step_classes(labelled: Any, serve: Any) -> None:
    root, models = labelled
    server = serve(model_dir=str(root), warmup=False)
    reference = zoo.Reference(models["multi_output"])
    xs = _xs([1, 6, 17])
    wants = [reference(x) for x in xs]  # [tags [T, 3], label [2]]
    with Client(server.target, timeout=60) as client:
        # Default: each output as it is (tags per step, label per sequence), with step classes.
        for x, (tags, label), p in zip(xs, wants, client.predict("multi_output", xs), strict=True):
            assert set(p.outputs) == {"tags", "label"}
            assert p["tags"].sequence is None
            np.testing.assert_allclose(p["tags"].steps, tags, rtol=0, atol=ATOL)
            assert p["tags"].step_classes is not None
            assert p["tags"].step_classes.tolist() == tags.argmax(axis=1).tolist()
            assert p["label"].steps is None
            np.testing.assert_allclose(p["label"].sequence, label, rtol=0, atol=ATOL)
            assert p.length == len(x)

        # One output by name, the sequence mode: the per-step head sends its last step.
        [p] = client.predict("multi_output", xs[2:], outputs=["tags"], output="sequence")
        assert set(p.outputs) == {"tags"}
        assert p["tags"].steps is None
        np.testing.assert_allclose(p["tags"].sequence, wants[2][0][-1], rtol=0, atol=ATOL)

        # top-k: the highest scores first, with their labels and the model's own values.
        [p] = client.predict("multi_output", xs[1:2], outputs=["label", "tags"], top_k=2)
        label = wants[1][1]
        order = np.argsort(-label, kind="stable")[:2].tolist()
        top = p["label"].top_k
        assert [c.index for c in top] == order
        assert [c.label for c in top] == [LABELS[i] for i in order]
        np.testing.assert_allclose([c.score for c in top], label[order], rtol=0, atol=ATOL)
        assert p["label"].label == LABELS[order[0]]
        assert list(p.outputs) == ["label", "tags"]  # in the order asked for

        # A per-sequence head of a causal model has per-step values too: the answer so far.
        reference = zoo.Reference(models["lstm_masked"])
        [p] = client.predict("lstm_masked", xs[2:], output="steps")
        want = np.stack([reference(xs[2][: t + 1])[0] for t in range(len(xs[2]))])
        got = p.output.steps
        assert got is not None
        assert p.output.sequence is None
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_bad_output_choices_are_refused(labelled: Any, serve: Any) -> None:
    root, _ = labelled
    server = serve(model_dir=str(root), warmup=False)
    with Client(server.target, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as unknown:
            client.predict("multi_output", _xs([4]), outputs=["nope"])
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nope" in unknown.value.details()
        assert "tags" in unknown.value.details()  # names what exists

        with pytest.raises(grpc.RpcError) as negative:
            client.predict("multi_output", _xs([4]), top_k=-1)
        assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_k" in negative.value.details()


def test_one_bad_sequence_fails_its_request_and_names_it(labelled: Any, serve: Any) -> None:
    root, _ = labelled
    server = serve(model_dir=str(root), warmup=False)
    xs = _xs([5, 7, 9])
    xs[1] = xs[1].copy()
    xs[1][2, 0] = np.inf
    with Client(server.target, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as failed:
            client.predict("lstm_masked", xs)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sequence 1" in failed.value.details()
        assert "timestep 2" in failed.value.details()
        # Nothing of the refused request was queued or computed.
        assert server.batcher_stats("lstm_masked").rows == 0
        # The same client's next request is answered.
        assert [p.length for p in client.predict("lstm_masked", xs[::2])] == [5, 9]
