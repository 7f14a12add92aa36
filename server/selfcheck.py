"""Load-time self-check: before a model takes traffic with mixed-length batches, run a few probe
sequences through the plan as one padded batch and compare each with the model called on that
sequence alone. A mismatch (a mask wired in a way the planner did not follow, a Keras behaviour we
did not foresee) demotes the model to equal-length batching instead of serving wrong numbers."""

from __future__ import annotations

from typing import Any

import numpy as np

from rnnserve.server.plan import Mode
from rnnserve.server.runner import ModelRunner, RowResult

TOLERANCE = 1e-5


def probes(runner: ModelRunner, max_length: int) -> list[np.ndarray]:
    plan = runner.forward.plan
    rng = np.random.default_rng(0)
    lengths = sorted({min(n, max_length) for n in (1, 4, 9)})  # two lengths or more if T allows
    sequences = []
    for n in lengths:
        if plan.input_dtype == "int32":
            x = rng.integers(0, plan.vocab_size or 2, size=(n, *plan.step_shape)).astype(np.int32)
        else:
            x = rng.normal(size=(n, *plan.step_shape)).astype(np.float32)
        if n > 2:
            x[1] = 0  # an all-zero step inside the sequence: masked by Masking / mask_zero
        sequences.append(x)
    return sequences


def _alone(model: Any, x: np.ndarray) -> list[np.ndarray]:
    import tensorflow as tf

    spec = tf.TensorSpec([1, *x.shape], tf.as_dtype(x.dtype))
    fn = tf.function(lambda v: model(v, training=False)).get_concrete_function(spec)
    out = fn(tf.constant(x[None]))
    return [np.asarray(o)[0] for o in (out if isinstance(out, list | tuple) else [out])]


def _stateless_twin(model: Any) -> Any:
    """The same model and weights with `stateful=False` and a free batch size: what a stateful
    model computes for one sequence from a fresh state, without keeping state between calls."""
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"].pop("stateful", None)
        if layer["class_name"] == "InputLayer" and "batch_shape" in layer["config"]:
            layer["config"]["batch_shape"] = [None, *layer["config"]["batch_shape"][1:]]
    twin = type(model).from_config(config)
    twin.set_weights(model.get_weights())
    return twin


def mismatch(model: Any, runner: ModelRunner, max_length: int) -> float:
    """Largest difference beyond tolerance between batched and alone answers (0.0 if none)."""
    plan = runner.forward.plan
    if plan.mode is Mode.EQUAL_LENGTH:
        return 0.0  # nothing claimed
    if any(getattr(layer, "stateful", False) for layer in model.layers):
        try:  # the original would carry state from one probe to the next, and fix the batch
            model = _stateless_twin(model)
        except Exception:  # a layout this does not know: no reference, nothing to compare
            return 0.0
    sequences = probes(runner, max_length)
    rows = runner.run(sequences, [None] * len(sequences))
    worst = 0.0
    for x, row in zip(sequences, rows, strict=True):
        if not isinstance(row, RowResult):
            raise row
        for got, stepped, want in zip(row.heads, row.stepped, _alone(model, x), strict=True):
            got = got if (not stepped or want.ndim == got.ndim) else got[-1]
            excess = np.abs(got - want) - TOLERANCE * (1 + np.abs(want))
            worst = max(worst, float(excess.max(initial=0.0)))
    return worst


def rows_interact(runner: ModelRunner, length: int) -> float:
    """For an equal-length plan (the model itself runs on each batch): the largest difference
    between three rows of one batch and each row run alone (0.0 if none). A layer that works
    across the batch axis (a softmax or a normalization over axis 0) makes rows depend on
    their neighbours, which equal lengths do not prevent. A model that fails on the probe
    (a cropping layer at a short length, say) tells nothing: 0.0."""
    plan = runner.forward.plan
    rng = np.random.default_rng(1)
    shape = (3, length, *plan.step_shape)
    if plan.input_dtype == "int32":
        batch = rng.integers(0, plan.vocab_size or 2, size=shape).astype(np.int32)
    else:
        batch = rng.normal(size=shape).astype(np.float32)
    together = runner.run(list(batch), [None] * len(batch))
    worst = 0.0
    for x, row in zip(batch, together, strict=True):
        [alone] = runner.run([x], [None])
        if not (isinstance(row, RowResult) and isinstance(alone, RowResult)):
            return 0.0
        for got, want in zip(row.heads, alone.heads, strict=True):
            excess = np.abs(got - want) - TOLERANCE * (1 + np.abs(want))
            worst = max(worst, float(excess.max(initial=0.0)))
    return worst
