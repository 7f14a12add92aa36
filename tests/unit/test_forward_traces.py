"""EQUAL_LENGTH models trace one graph per sequence length; the forward keeps only the most
recently used few, and a length traced again after being dropped still computes model(x)."""

from __future__ import annotations

import numpy as np

from rnnserve.server.forward import Forward, pad_batch
from rnnserve.server.plan import Mode, build_plan

import zoo

ATOL = 1e-5


def test_equal_length_traces_are_a_bounded_lru() -> None:
    arch = zoo.BY_NAME["pooled"]
    model = zoo.build(arch)
    plan = build_plan(model)
    assert plan.mode is Mode.EQUAL_LENGTH
    cap = 3
    forward = Forward(plan, max_traces=cap)
    assert forward.xla is False
    rng = np.random.default_rng(3)
    # Lengths revisited after and before being dropped; more distinct ones than the cap.
    order = [4, 7, 4, 9, 11, 4, 7, 2, 7, 13, 4]
    recent: list[int] = []  # what an LRU of `cap` should hold, least recent first
    for length in order:
        xs = zoo.sequences(arch, [length, length], rng)
        x, lengths = pad_batch(xs, plan.step_shape, plan.input_dtype)
        out = forward(x, lengths)
        np.testing.assert_allclose(
            out.heads[0], np.asarray(model(x, training=False)), rtol=0, atol=ATOL
        )
        if length in recent:
            recent.remove(length)
        recent = [*recent, length][-cap:]
        assert len(forward._traced) <= cap
        assert list(forward._traced) == recent
