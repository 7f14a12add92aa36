"""Architectures as data, a length-bucketing padded batch generator, and the writer of the
``models/<name>/<version>/`` layout the server reads.

A specification is a list of layer tuples, one per layer, applied in order::

    (LayerClass, [positional args], {keyword args})
    (LayerClass, [args], {kwargs}, (Wrapper, [wrapper args], {wrapper kwargs}))

The optional fourth element wraps the layer: ``Wrapper(layer, *wrapper_args, **wrapper_kwargs)``,
e.g. ``(Dense, [9], {"activation": "softmax"}, (TimeDistributed, [], {"name": "speaker"}))``.
Unlike a ``Sequential`` stack, the model is Functional with an explicit ``keras.Input`` so the
time dimension stays free (``None``) and masks flow from a ``Masking`` layer to the RNNs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import keras
import numpy as np
import numpy.typing as npt

__all__ = [
    "FloatArray",
    "IntArray",
    "LayerSpec",
    "PaddedBatches",
    "build_model",
    "masked_moments",
    "pad_sequences",
    "padded_dataset",
    "predict_sequences",
    "save_for_serving",
    "set_seed",
    "with_step_outputs",
    "without_time_distributed",
    "write_json",
]

FloatArray: TypeAlias = npt.NDArray[np.float32]
IntArray: TypeAlias = npt.NDArray[np.int64]
LayerFactory: TypeAlias = Callable[..., Any]
WrapperSpec: TypeAlias = tuple[LayerFactory, Sequence[Any], Mapping[str, Any]]
LayerSpec: TypeAlias = (
    tuple[LayerFactory, Sequence[Any], Mapping[str, Any]]
    | tuple[LayerFactory, Sequence[Any], Mapping[str, Any], WrapperSpec]
)


def _make_layer(index: int, item: Sequence[Any]) -> keras.layers.Layer:
    if len(item) not in (3, 4):
        raise ValueError(f"spec[{index}]: expected 3 or 4 elements, got {len(item)}")
    factory, args, kwargs = item[0], item[1], item[2]
    layer = factory(*args, **kwargs)
    if len(item) == 4:
        if len(item[3]) != 3:
            raise ValueError(f"spec[{index}]: wrapper must be (Wrapper, [args], {{kwargs}})")
        wrapper, wrapper_args, wrapper_kwargs = item[3]
        # The wrapped layer is always the wrapper's first argument (as in TimeDistributed).
        layer = wrapper(layer, *wrapper_args, **wrapper_kwargs)
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(f"spec[{index}]: {factory!r} did not build a keras Layer")
    return layer


def build_model(
    spec: Sequence[LayerSpec],
    input_shape: tuple[int | None, ...],
    input_dtype: str = "float32",
    name: str = "model",
    input_name: str = "frames",
) -> keras.Model:
    """Build a Functional model from layer tuples (see the module docstring)."""
    if not spec:
        raise ValueError("empty specification")
    inputs = keras.Input(shape=input_shape, dtype=input_dtype, name=input_name)
    outputs = inputs
    for index, item in enumerate(spec):
        outputs = _make_layer(index, item)(outputs)
    return keras.Model(inputs, outputs, name=name)


def without_time_distributed(spec: Sequence[LayerSpec]) -> list[LayerSpec]:
    """The same stack with every ``TimeDistributed(Dense)`` replaced by the bare ``Dense``
    (named like the wrapper), for training. Dense already acts on the last axis only, so the
    maths and the weight list are identical and ``set_weights`` carries over.

    Why: in Keras 3.15, ``TimeDistributed.call`` maps over ``ops.shape(inputs)[0]`` (the batch
    size) instead of the time axis when the time dimension is unknown at trace time, so
    ``fit``/``predict`` on variable-length batches give (B, B, n) outputs or fail. Eager calls
    are fine, so the served model keeps the wrapper the architecture asks for.
    """
    plain: list[LayerSpec] = []
    for item in spec:
        if len(item) == 4:
            wrapper, _, wrapper_kwargs = item[3]
            if wrapper is keras.layers.TimeDistributed and item[0] is keras.layers.Dense:
                kwargs = dict(item[2])
                if "name" in wrapper_kwargs:
                    kwargs["name"] = wrapper_kwargs["name"]
                plain.append((item[0], item[1], kwargs))
                continue
        plain.append(item)
    return plain


def with_step_outputs(spec: Sequence[LayerSpec]) -> list[LayerSpec]:
    """The same stack with ``return_sequences=True`` on every recurrent layer, for training a
    many-to-one classifier with a loss at every step ("deep supervision"). The weights are
    identical; the served many-to-one model's output is this twin's output at the last step.

    Why: with one loss at the end of a 1000-step sequence the gradient has to travel through
    every step; a loss at each step trains the same causal prefix classifier much faster.
    """
    stepped: list[LayerSpec] = []
    for item in spec:
        factory = item[0]
        if isinstance(factory, type) and issubclass(factory, keras.layers.RNN):
            stepped.append((factory, item[1], {**item[2], "return_sequences": True}, *item[3:]))
        else:
            stepped.append(item)
    return stepped


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and the backend, and ask TensorFlow for deterministic kernels."""
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def masked_moments(sequences: Sequence[FloatArray]) -> tuple[FloatArray, FloatArray]:
    """Per-feature mean and variance over the real frames only (padding excluded), for a
    ``Normalization(mean=..., variance=...)`` layer placed after ``Masking``."""
    frames = np.concatenate(sequences, axis=0).astype(np.float64)
    return frames.mean(axis=0).astype(np.float32), frames.var(axis=0).astype(np.float32)


def pad_sequences(
    sequences: Sequence[np.ndarray], pad_value: float = 0.0, dtype: str = "float32"
) -> np.ndarray:
    """Post-pad sequences (T_i, ...) to (B, max T_i, ...). Zero is the padding value that the
    models' ``Masking`` layer and the server both use."""
    longest = max(len(s) for s in sequences)
    shape = (len(sequences), longest, *sequences[0].shape[1:])
    batch = np.full(shape, pad_value, dtype=dtype)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return batch


Batch: TypeAlias = tuple[np.ndarray, ...]


def padded_dataset(
    make_batches: Callable[[], Iterable[Batch]],
    num_batches: int,
    features: int,
    per_step: bool,
) -> Any:
    """Wrap a generator of padded numpy batches in a ``tf.data.Dataset`` for ``model.fit``.

    ``make_batches`` is called afresh for every epoch. The signature keeps the batch and time
    dimensions free: ``keras.utils.PyDataset`` instead guesses them from its first two batches,
    and fails later when those happened to share a length (seen with JapaneseVowels).
    Batches are ``(x, y)`` with one label per row, or ``(x, y, weights)`` with one per step.
    """
    import tensorflow as tf

    x_spec = tf.TensorSpec((None, None, features), tf.float32)
    if per_step:
        signature: tuple[Any, ...] = (
            x_spec,
            tf.TensorSpec((None, None), tf.int64),
            tf.TensorSpec((None, None), tf.float32),
        )
    else:
        signature = (x_spec, tf.TensorSpec((None,), tf.int64))
    dataset = tf.data.Dataset.from_generator(make_batches, output_signature=signature)
    # A known length gives Keras a proper progress bar from the first epoch.
    return dataset.apply(tf.data.experimental.assert_cardinality(num_batches)).prefetch(2)


class PaddedBatches:
    """Mini-batches of sequences of similar length, zero-padded to the longest *in the batch*.

    Padding everything to the global maximum wastes most of the compute when lengths vary
    (PLAID: 100..1344). Each epoch the cases are shuffled, cut into pools of
    ``pool_batches * batch_size`` cases, each pool is sorted by length and cut into batches,
    and the batch order is shuffled: batches stay length-homogeneous yet differ per epoch, and
    their number never changes. Iterate for numpy batches, or pass ``dataset()`` to ``fit``.

    ``targets`` is either one integer label per sequence (many-to-one) or one integer label
    array per sequence, same length as it (many-to-many). For the latter, padded steps get
    label 0 and sample weight 0, so they count in neither loss nor ``weighted_metrics``.
    """

    def __init__(
        self,
        sequences: Sequence[FloatArray],
        targets: Sequence[int] | IntArray | Sequence[IntArray],
        batch_size: int = 32,
        *,
        shuffle: bool = True,
        pool_batches: int = 8,
        seed: int = 0,
    ) -> None:
        if len(sequences) != len(targets):
            raise ValueError(f"{len(sequences)} sequences but {len(targets)} targets")
        self.sequences = list(sequences)
        self.per_step = np.ndim(targets[0]) == 1
        self.targets = list(targets) if self.per_step else np.asarray(targets, dtype=np.int64)
        if self.per_step:
            for index, (x, y) in enumerate(zip(self.sequences, self.targets, strict=True)):
                if len(x) != len(y):
                    raise ValueError(f"case {index}: {len(x)} steps but {len(y)} step labels")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.pool_size = max(1, pool_batches) * batch_size
        self.lengths = np.array([len(s) for s in self.sequences])
        self.rng = np.random.default_rng(seed)

    def _plan(self) -> list[np.ndarray]:
        count = len(self.sequences)
        order = self.rng.permutation(count) if self.shuffle else np.arange(count)
        batches: list[np.ndarray] = []
        for start in range(0, count, self.pool_size):
            pool = order[start : start + self.pool_size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches.extend(
                pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)
            )
        if self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        count = len(self.sequences)
        return sum(
            -(-min(self.pool_size, count - start) // self.batch_size)
            for start in range(0, count, self.pool_size)
        )

    def __iter__(self) -> Iterator[Batch]:
        for rows in self._plan():
            x = pad_sequences([self.sequences[i] for i in rows])
            if not self.per_step:
                yield x, np.asarray(self.targets)[rows]
                continue
            y = pad_sequences([self.targets[i] for i in rows], dtype="int64")
            weights = pad_sequences([np.ones(len(self.targets[i])) for i in rows])
            yield x, y, weights

    def dataset(self) -> Any:
        """A ``tf.data.Dataset`` over fresh batches every epoch (see :func:`padded_dataset`)."""
        features = self.sequences[0].shape[-1]
        return padded_dataset(self.__iter__, len(self), features, self.per_step)


def predict_sequences(
    model: keras.Model, sequences: Sequence[FloatArray], batch_size: int = 64
) -> list[np.ndarray]:
    """Run ``model`` over variable-length sequences in length-sorted padded batches and return
    one output per sequence, per-step outputs trimmed to the sequence's own length."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    results: list[np.ndarray] = [np.empty(0)] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_sequences([sequences[i] for i in rows])
        outputs = keras.ops.convert_to_numpy(model(batch, training=False))
        for row, index in enumerate(rows):
            out = outputs[row]
            results[index] = out[: len(sequences[index])] if out.ndim == 2 else out
    return results


def _check_config(model: keras.Model, config: Mapping[str, Any]) -> None:
    for key in ("description", "max_length", "outputs"):
        if key not in config:
            raise ValueError(f"config needs {key!r}")
    if not isinstance(config["max_length"], int) or config["max_length"] < 1:
        raise ValueError("config max_length must be a positive integer")
    output_units = {
        name: int(tensor.shape[-1])
        for name, tensor in zip(model.output_names, model.outputs, strict=True)
    }
    if set(config["outputs"]) != set(output_units):
        raise ValueError(f"config outputs {sorted(config['outputs'])} != model {output_units}")
    for name, spec in config["outputs"].items():
        labels = spec.get("labels")
        if labels is not None and len(labels) != output_units[name]:
            raise ValueError(f"{name}: {len(labels)} labels for {output_units[name]} units")


def save_for_serving(model: keras.Model, directory: str | Path, config: dict[str, Any]) -> Path:
    """Write ``model.keras`` and ``config.json`` into ``directory`` (``models/<name>/<version>``)
    and check the file reloads with ``safe_mode=True`` and gives the same outputs.

    The saved copy is an uncompiled clone: no optimizer state (smaller file) and nothing but
    standard layers for the server to deserialize.
    """
    _check_config(model, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    serving = keras.models.clone_model(model)
    serving.set_weights(model.get_weights())
    path = directory / "model.keras"
    serving.save(path)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    reloaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    probe = np.random.default_rng(0).normal(size=(2, 9, *model.input_shape[2:]))
    probe = probe.astype(model.inputs[0].dtype)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(probe)),
        keras.ops.convert_to_numpy(model(probe, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )
    return path


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write a small JSON document (metrics, configs) with a trailing newline."""
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
