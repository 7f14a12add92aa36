"""The load-time self-check that demotes a model to equal-length batching: it must see a plan that
computes something other than the model, and must pass a plan that computes the model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from rnnserve.server.forward import Forward
from rnnserve.server.plan import Mode, build_plan
from rnnserve.server.runner import ModelRunner, RowResult
from rnnserve.server.selfcheck import TOLERANCE, mismatch

import zoo

MAX_LENGTH = 60


def _untrained(arch: zoo.Arch, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)  # initial weights differ by seed; no training (fast)
    return arch.build()


def _runner(model: keras.Model) -> ModelRunner:
    return ModelRunner(Forward(build_plan(model), xla=False))


# One many-to-one head behind a Masking layer, one per-step head.
@pytest.mark.parametrize("name", ["lstm_masked", "gru_steps"])
def test_mismatch_sees_a_plan_of_other_weights_and_passes_the_models_own(name: str) -> None:
    arch = zoo.BY_NAME[name]
    model, other = _untrained(arch, seed=0), _untrained(arch, seed=1)  # only weights differ
    own, foreign = _runner(model), _runner(other)
    assert own.forward.plan.mode is not Mode.EQUAL_LENGTH  # so the check does run

    assert mismatch(model, own, MAX_LENGTH) == 0.0
    wrong = mismatch(model, foreign, MAX_LENGTH)
    # Far beyond float error: the answers of different weights, not rounding.
    assert wrong > 100 * TOLERANCE, f"{name}: a plan of other weights passed ({wrong:.2e})"


class _BlindToPadding:
    """A runner that pads the probes with zeros to the longest and runs the model on them with no
    mask: right for a batch of one length, wrong for every padded row of a model without a mask."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.forward = _runner(model).forward  # its plan is what the probes are made for

    def run(self, sequences: list[np.ndarray], deadlines: list[None]) -> list[RowResult]:
        longest = max(len(x) for x in sequences)
        batch = np.zeros((len(sequences), longest, *sequences[0].shape[1:]), np.float32)
        for row, x in zip(batch, sequences, strict=True):
            row[: len(x)] = x
        out = np.asarray(self.model(batch, training=False))
        return [RowResult([last], [False], []) for last in out]


@pytest.mark.parametrize("max_length", [2, 3])
def test_a_short_model_is_still_probed_with_padding(max_length: int) -> None:
    """With a maximum length under 4 the probes were one sequence of length 1: nothing was padded,
    so a plan blind to padding passed. Now they are of two lengths or more whenever T allows."""
    model = _untrained(zoo.BY_NAME["simple_stack"], seed=0)  # no mask; one output per sequence
    assert mismatch(model, _runner(model), max_length) == 0.0
    wrong = mismatch(model, _BlindToPadding(model), max_length)  # type: ignore[arg-type]
    assert wrong > 100 * TOLERANCE, f"padding went unseen at max_length {max_length} ({wrong:.2e})"
