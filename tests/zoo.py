"""The architectures every exactness test runs over: small Keras models, briefly trained on random
data (so weights and BatchNormalization statistics are not at their initial values), saved into a
model repository the tests serve."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers as L

D = 6  # features per timestep
VOCAB = 30  # token-id models
FIXED_T = 320  # fixed-length model: longer than the longest test sequence


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], keras.Model]
    tokens: bool = False
    causal: bool = True  # can stream
    mixed: bool = True  # mixed lengths share batches
    legacy_h5: bool = False
    fit_batch: int | None = None  # fixed batch size (stateful models)


def _functional(body: Callable[[keras.KerasTensor], object], tokens: bool = False) -> keras.Model:
    inp = keras.Input((None,), dtype="int32") if tokens else keras.Input((None, D))
    return keras.Model(inp, body(inp))


def _lstm_masked() -> keras.Model:
    return _functional(
        lambda i: L.Dense(4, activation="softmax", name="label")(L.LSTM(12)(L.Masking(0.0)(i)))
    )


def _gru_steps() -> keras.Model:
    return _functional(
        lambda i: L.TimeDistributed(L.Dense(3, activation="softmax"), name="tags")(
            L.GRU(10, return_sequences=True)(i)
        )
    )


def _simple_stack() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((None, D)),
            L.SimpleRNN(9, return_sequences=True),
            L.SimpleRNN(7),
            L.Dense(3, name="label"),
        ]
    )


def _stacked_norm_steps() -> keras.Model:
    def body(i: keras.KerasTensor) -> object:
        h = L.TimeDistributed(L.Dense(8, activation="relu"))(i)
        h = L.LSTM(10, return_sequences=True)(h)
        h = L.Dropout(0.2)(h)
        h = L.LayerNormalization()(h)
        h = L.GRU(8, return_sequences=True)(h)
        return L.TimeDistributed(L.Dense(5, activation="softmax"), name="tags")(h)

    return _functional(body)


def _collapse_then_dense() -> keras.Model:
    def body(i: keras.KerasTensor) -> object:
        h = L.GRU(12)(L.Masking(0.0)(i))
        h = L.BatchNormalization()(h)
        h = L.Activation("tanh")(L.Dense(6)(h))
        return L.Dense(3, activation="softmax", name="label")(L.Dropout(0.1)(h))

    return _functional(body)


def _bidirectional() -> keras.Model:
    return _functional(lambda i: L.Dense(3, name="label")(L.Bidirectional(L.LSTM(8))(i)))


def _bidirectional_steps() -> keras.Model:
    return _functional(
        lambda i: L.TimeDistributed(L.Dense(4), name="tags")(
            L.Bidirectional(L.GRU(6, return_sequences=True))(L.Masking(0.0)(i))
        )
    )


def _backwards() -> keras.Model:
    return _functional(lambda i: L.Dense(3, name="label")(L.GRU(8, go_backwards=True)(i)))


def _embedding_masked() -> keras.Model:
    return _functional(
        lambda i: L.Dense(4, name="label")(L.LSTM(10)(L.Embedding(VOCAB, 5, mask_zero=True)(i))),
        tokens=True,
    )


def _embedding_plain_steps() -> keras.Model:
    return _functional(
        lambda i: L.Dense(3, name="tags")(
            L.GRU(8, return_sequences=True)(L.Embedding(VOCAB, 4)(i))
        ),
        tokens=True,
    )


def _stateful() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((None, D), batch_size=4),
            L.LSTM(10, stateful=True, return_sequences=True),
            L.GRU(6, stateful=True),
            L.Dense(3, name="label"),
        ]
    )


def _fixed_length() -> keras.Model:
    return keras.Sequential(
        [keras.Input((FIXED_T, D)), L.Masking(0.0), L.LSTM(8), L.Dense(3, name="label")]
    )


def _multi_output() -> keras.Model:
    inp = keras.Input((None, D))
    h = L.LSTM(10, return_sequences=True)(inp)
    tags = L.TimeDistributed(L.Dense(3, activation="softmax"), name="tags")(h)
    label = L.Dense(2, activation="softmax", name="label")(L.GRU(6)(h))
    return keras.Model(inp, [tags, label])


def _merged_branches() -> keras.Model:
    inp = keras.Input((None, D))
    a = L.GRU(6, return_sequences=True)(inp)
    b = L.SimpleRNN(6, return_sequences=True)(inp)
    h = L.Concatenate()([a, L.Add()([a, b])])
    return keras.Model(inp, L.Dense(3, name="label")(L.LSTM(5)(h)))


def _pooled() -> keras.Model:
    # GlobalAveragePooling1D is not proven exact under padding: equal-length batching only.
    return _functional(
        lambda i: L.Dense(3, name="label")(
            L.GlobalAveragePooling1D()(L.LSTM(8, return_sequences=True)(i))
        )
    )


def _explicit_mask_steps() -> keras.Model:
    # A mask the model computes itself and passes in (`mask=`), not propagated from a masking
    # layer: the engine would drop it, so equal-length batching only. It used to claim exact:
    # the load-time self-check's few probe steps seldom hold a value this rare (a glitch).
    inp = keras.Input((None, D))
    plausible = keras.ops.less(keras.ops.max(inp, axis=-1), 3.0)
    h = L.GRU(8, return_sequences=True)(inp, mask=plausible)
    return keras.Model(inp, L.Dense(3, name="tags")(h))


ARCHITECTURES: tuple[Arch, ...] = (
    Arch("lstm_masked", _lstm_masked),
    Arch("gru_steps", _gru_steps),
    Arch("simple_stack", _simple_stack, legacy_h5=True),
    Arch("stacked_norm_steps", _stacked_norm_steps),
    Arch("collapse_then_dense", _collapse_then_dense),
    Arch("bidirectional", _bidirectional, causal=False),
    Arch("bidirectional_steps", _bidirectional_steps, causal=False),
    Arch("backwards", _backwards, causal=False),
    Arch("embedding_masked", _embedding_masked, tokens=True),
    Arch("embedding_plain_steps", _embedding_plain_steps, tokens=True),
    Arch("stateful", _stateful, fit_batch=4),
    Arch("fixed_length", _fixed_length),
    Arch("multi_output", _multi_output),
    Arch("merged_branches", _merged_branches),
    Arch("pooled", _pooled, causal=False, mixed=False),
    Arch("explicit_mask_steps", _explicit_mask_steps, causal=False, mixed=False),
)
BY_NAME = {a.name: a for a in ARCHITECTURES}


def sequences(arch: Arch, lengths: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    if arch.tokens:
        return [rng.integers(0, VOCAB, size=n).astype(np.int32) for n in lengths]
    out = []
    for n in lengths:
        x = rng.normal(size=(n, D)).astype(np.float32)
        if n > 3:
            x[n // 2] = 0.0  # an all-zero frame inside the sequence: masked by Masking models
        out.append(x)
    return out


def _fit(arch: Arch, model: keras.Model, rng: np.random.Generator) -> None:
    n = 32 if arch.fit_batch is None else 8 * arch.fit_batch
    t = 20 if arch.name != "fixed_length" else FIXED_T
    x = (
        rng.integers(1, VOCAB, size=(n, t)).astype(np.int32)
        if arch.tokens
        else rng.normal(size=(n, t, D)).astype(np.float32)
    )
    targets = []
    for out in model.outputs:
        shape = (n, *(t if d is None else d for d in out.shape[1:]))
        targets.append(rng.normal(size=shape).astype(np.float32))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(
        x,
        targets if len(targets) > 1 else targets[0],
        epochs=2,
        batch_size=arch.fit_batch or 16,
        verbose=0,
        shuffle=False,
    )


def build(arch: Arch, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = arch.build()
    _fit(arch, model, np.random.default_rng(seed))
    return model


def write_repository(root: Path, names: list[str] | None = None) -> dict[str, keras.Model]:
    """Build, train and save the architectures into `root/<name>/1/`; returns the models."""
    models = {}
    for arch in ARCHITECTURES:
        if names is not None and arch.name not in names:
            continue
        model = build(arch)
        version = root / arch.name / "1"
        version.mkdir(parents=True)
        model.save(version / ("model.h5" if arch.legacy_h5 else "model.keras"))
        (version / "config.json").write_text(json.dumps({"description": arch.name}))
        models[arch.name] = model
    return models


def subset(root: Path, names: list[str], into: Path) -> Path:
    """A repository holding only `names` of `root` (links), so a server loads just those."""
    into.mkdir(parents=True, exist_ok=True)
    for name in names:
        (into / name).symlink_to(root / name, target_is_directory=True)
    return into


class Reference:
    """`model(x)` on one sequence alone, unpadded: a graph trace per distinct length with a static
    time dimension (eager Keras RNNs take seconds per long sequence; Keras' own predict reuses a
    trace with unknown time, where TimeDistributed computes wrong shapes). TimeDistributed unrolls
    a static time dimension into one op per step, so long sequences through it run eagerly."""

    def __init__(self, model: keras.Model) -> None:
        import tensorflow as tf

        self._model = model
        self._tf = tf
        self._by_length: dict[int, object] = {}
        self._time_distributed = any(isinstance(layer, L.TimeDistributed) for layer in model.layers)
        # A stateful model keeps state between calls; its stateless twin computes the same math.
        if any(getattr(layer, "stateful", False) for layer in model.layers):
            self._model = _stateless_twin(model)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        tf = self._tf
        if len(x) > 300 and self._time_distributed:
            out = self._model(x[None], training=False)
            return [np.asarray(o)[0] for o in (out if isinstance(out, list | tuple) else [out])]
        fn = self._by_length.get(len(x))
        if fn is None:
            spec = tf.TensorSpec([1, *x.shape], tf.as_dtype(x.dtype))
            fn = tf.function(lambda v: self._model(v, training=False)).get_concrete_function(spec)
            self._by_length[len(x)] = fn
        out = fn(tf.constant(x[None]))  # type: ignore[operator]
        outs = out if isinstance(out, list | tuple) else [out]
        return [np.asarray(o)[0] for o in outs]


def _stateless_twin(model: keras.Model) -> keras.Model:
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"].pop("stateful", None)
        if layer["class_name"] == "InputLayer":
            layer["config"]["batch_shape"] = [None, *layer["config"]["batch_shape"][1:]]
    twin = keras.Sequential.from_config(config)
    twin.set_weights(model.get_weights())
    return twin
