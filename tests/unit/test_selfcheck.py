"""The load-time self-check that demotes a model to equal-length batching: it must see a plan that
computes something other than the model, and must pass a plan that computes the model."""

from __future__ import annotations

import keras
import pytest

from rnnserve.server.forward import Forward
from rnnserve.server.plan import Mode, build_plan
from rnnserve.server.runner import ModelRunner
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
