"""Models whose padded engine fails (a Keras behaviour the planner did not foresee) still load:
demoted to equal-length batching with the reason in their notes, and they answer as `model(x)`
does. A model the padded engine cannot even build used to fail to load altogether."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

from rnnserve.server.model_config import ModelConfig
from rnnserve.server.plan import Mode
from rnnserve.server.runner import RowResult
from rnnserve.server.served_model import load_version
from rnnserve.server.settings import Settings

import zoo

L = keras.layers
T = 10  # time length of the fixed-length models


def _bidirectional_pair(i: keras.KerasTensor) -> keras.KerasTensor:
    # merge_mode=None: two outputs (and two masks) from one layer, joined again downstream.
    pair = L.Bidirectional(L.GRU(4, return_sequences=True), merge_mode=None)(L.Masking(0.0)(i))
    return L.Dense(2)(L.LSTM(5)(L.Concatenate()(pair)))


def _unrolled(i: keras.KerasTensor) -> keras.KerasTensor:
    return L.Dense(2)(L.Bidirectional(L.LSTM(4, unroll=True))(i))


def _fixed_functional(i: keras.KerasTensor) -> keras.KerasTensor:
    return L.Dense(2)(L.GRU(4)(L.Masking(0.0)(i)))


CASES: dict[str, tuple[Callable[[keras.KerasTensor], keras.KerasTensor], int | None]] = {
    "bidirectional_pair": (_bidirectional_pair, None),
    "unrolled_bidirectional": (_unrolled, T),
    "fixed_length_functional": (_fixed_functional, T),
}


@pytest.mark.parametrize("name", CASES)
def test_a_model_the_padded_engine_fails_on_is_served_by_equal_lengths(
    name: str, tmp_path: Path
) -> None:
    build, length = CASES[name]
    keras.utils.set_random_seed(0)
    inp = keras.Input((length, zoo.D))
    model = keras.Model(inp, build(inp))
    version_dir = tmp_path / name / "1"
    version_dir.mkdir(parents=True)
    model.save(version_dir / "model.keras")
    served = load_version(name, 1, version_dir, ModelConfig(), Settings(warmup=False, xla=False))
    try:
        assert served.plan.mode is Mode.EQUAL_LENGTH
        assert "failed its self-check" in served.plan.notes[0], served.plan.notes
        rng = np.random.default_rng(1)
        lengths = [length] * 3 if length else [2, 6, 6]
        xs = [rng.normal(size=(n, zoo.D)).astype(np.float32) for n in lengths]
        xs[1][3] = 0.0  # a masked frame
        for x in xs:
            [row] = served.runner.run([x], [None])
            assert isinstance(row, RowResult), row
            [want] = zoo.Reference(model)(x)
            np.testing.assert_allclose(row.heads[0].reshape(want.shape), want, rtol=0, atol=1e-5)
    finally:
        served.runner.forward.close()


def test_the_self_check_covers_stateful_models() -> None:
    """A model saved with `stateful=True` and a fixed batch size is checked against the same
    model made stateless (it used to be skipped): right answers pass, wrong ones are caught."""
    from rnnserve.server.forward import Forward
    from rnnserve.server.plan import build_plan
    from rnnserve.server.runner import ModelRunner
    from rnnserve.server.selfcheck import mismatch

    model = zoo.build(zoo.BY_NAME["stateful"])
    runner = ModelRunner(Forward(build_plan(model), xla=False))
    try:
        assert mismatch(model, runner, 60) == 0.0
        right = runner.run

        def wrong(*args: object, **kwargs: object) -> list[RowResult]:
            rows = right(*args, **kwargs)  # type: ignore[arg-type]
            return [RowResult([h + 0.01 for h in r.heads], r.stepped, r.states) for r in rows]

        runner.run = wrong  # type: ignore[method-assign]
        assert mismatch(model, runner, 60) > 0
    finally:
        runner.forward.close()


@pytest.mark.parametrize(
    "grow", [L.UpSampling1D(2), L.ZeroPadding1D(2)], ids=["upsampling", "zero_padding"]
)
def test_a_per_step_output_longer_than_the_input_is_returned_whole(
    grow: keras.layers.Layer, tmp_path: Path
) -> None:
    """An output with a time axis of its own length is not trimmed to the input's: it used to
    be reported per step and cut to the input length (7 of 14 rows)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, zoo.D))
    model = keras.Model(inp, L.Dense(3)(L.GRU(5, return_sequences=True)(grow(inp))))
    version_dir = tmp_path / "grown" / "1"
    version_dir.mkdir(parents=True)
    model.save(version_dir / "model.keras")
    served = load_version("grown", 1, version_dir, ModelConfig(), Settings(warmup=False, xla=False))
    try:
        assert served.plan.mode is Mode.EQUAL_LENGTH
        assert [o.per_step for o in served.plan.outputs] == [False]
        x = np.random.default_rng(1).normal(size=(7, zoo.D)).astype(np.float32)
        [row] = served.runner.run([x], [None])
        assert isinstance(row, RowResult), row
        [want] = zoo.Reference(model)(x)
        assert want.shape[0] > len(x)
        np.testing.assert_allclose(row.heads[0].reshape(want.shape), want, rtol=0, atol=1e-5)
    finally:
        served.runner.forward.close()


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis 0")  # on purpose here
def test_a_model_whose_rows_interact_is_batched_one_sequence_at_a_time(tmp_path: Path) -> None:
    """A softmax over the batch axis: equal lengths used to share batches, so each answer
    depended on its neighbours (0.45 where the model alone gives 1.0)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, zoo.D))
    model = keras.Model(inp, L.Softmax(axis=0)(L.Dense(3)(L.LSTM(5)(inp))))
    version_dir = tmp_path / "across" / "1"
    version_dir.mkdir(parents=True)
    model.save(version_dir / "model.keras")
    settings = Settings(warmup=False, xla=False)
    served = load_version("across", 1, version_dir, ModelConfig(), settings)
    try:
        assert served.plan.mode is Mode.EQUAL_LENGTH
        assert "one per batch" in served.plan.notes[-1], served.plan.notes
        assert served.batcher.policy.max_batch_size == 1
    finally:
        served.runner.forward.close()


@pytest.mark.parametrize("nested", [False, True], ids=["top_level", "nested"])
def test_a_stateful_layer_the_engine_cannot_prove_is_refused_with_the_reason(nested: bool) -> None:
    """Equal-length batching runs the model itself, which would carry state from one batch to
    the next. A stateful layer inside a nested model used to pass this check and fail later
    with "inference failed" and no reason."""
    from rnnserve.server.errors import InvalidInput
    from rnnserve.server.plan import build_plan

    inp = keras.Input((None, zoo.D), batch_size=1)
    lstm = L.LSTM(5, stateful=True, return_sequences=True, name="carrier")
    hidden = keras.Sequential([keras.Input((None, zoo.D), batch_size=1), lstm]) if nested else lstm
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling1D()(hidden(inp))))
    with pytest.raises(InvalidInput, match=r"layer carrier is stateful .* re-save it"):
        build_plan(model)
