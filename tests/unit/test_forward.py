"""The compiled forward itself (no server): both compiled forms, XLA shape buckets and state
passing across chunks, against the model called on each sequence alone."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from rnnserve.server.forward import Forward, bucket_length, bucket_rows, pad_batch
from rnnserve.server.plan import Mode, build_plan

import zoo

ATOL = 1e-5


def test_buckets() -> None:
    lengths = (1, 2, 3, 5, 7, 13, 17, 25, 33, 65, 100, 300)
    assert [bucket_length(n) for n in lengths] == [1, 2, 4, 8, 8, 16, 32, 32, 64, 96, 128, 384]
    assert [bucket_rows(n, 64) for n in (1, 2, 4, 5, 17, 33, 64)] == [1, 4, 4, 16, 64, 64, 64]
    assert bucket_rows(20, 32) == 32  # capped at the batch limit
    assert bucket_rows(100, 64) == 100  # above the batch limit: its own size


def _expected(plan_outputs, heads, stepped, row, length):  # type: ignore[no-untyped-def]
    for spec, head, st in zip(plan_outputs, heads, stepped, strict=True):
        if spec.per_step:
            yield head[row, :length]
        else:
            yield head[row, length - 1] if st else head[row]


# XLA pads a batch further, to its bucket (more rows of length 0, more timesteps): every
# architecture that batches mixed lengths is checked there; the graph form on a few.
_CASES = [pytest.param(a.name, True, id=f"{a.name}-xla") for a in zoo.ARCHITECTURES if a.mixed] + [
    pytest.param(name, False, id=f"{name}-graph")
    for name in ("lstm_masked", "stacked_norm_steps", "bidirectional_steps", "embedding_masked")
]


@pytest.mark.parametrize(("name", "xla"), _CASES)
def test_padded_batch_equals_each_sequence_alone(name: str, xla: bool) -> None:
    arch = zoo.BY_NAME[name]
    model = zoo.build(arch)
    plan = build_plan(model)
    forward = Forward(plan, xla=xla)
    rng = np.random.default_rng(1)
    xs = zoo.sequences(arch, [1, 5, 17, 40, 9], rng)
    forward.compile(len(xs), 40)
    rows, steps = forward.shape_for(len(xs), 40)
    assert (rows, steps) == ((16, 64) if xla else (5, 40))  # XLA runs the padded bucket
    x, lengths = pad_batch(xs, plan.step_shape, plan.input_dtype, steps, rows)
    out = forward(x, lengths)
    reference = zoo.Reference(model)
    for row, seq in enumerate(xs):
        got = list(_expected(plan.outputs, out.heads, out.stepped, row, len(seq)))
        for g, w in zip(got, reference(seq), strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)


@pytest.mark.parametrize("xla", [True, False], ids=["xla", "graph"])
def test_state_passing_chunks_equal_one_whole_run(xla: bool) -> None:
    arch = zoo.BY_NAME["multi_output"]
    model = zoo.build(arch)
    plan = build_plan(model)
    assert plan.mode is Mode.CAUSAL
    forward = Forward(plan, xla=xla)
    x = zoo.sequences(arch, [230], np.random.default_rng(2))[0]
    for size in (1, 7, 48):
        forward.compile(1, size)
    states = None
    tags, last = [], None
    for start in range(0, 230, 48):
        for chunk in (x[start : start + 1], x[start + 1 : start + 8], x[start + 8 : start + 48]):
            if len(chunk) == 0:
                continue
            rows, steps = forward.shape_for(1, len(chunk))
            padded, lengths = pad_batch([chunk], plan.step_shape, plan.input_dtype, steps, rows)
            out = forward(padded, lengths, states)
            states = out.states
            tags.append(out.heads[0][0, : len(chunk)])
            last = out.heads[1][0, len(chunk) - 1]
    want_tags, want_label = zoo.Reference(model)(x)
    np.testing.assert_allclose(np.concatenate(tags), want_tags, rtol=0, atol=ATOL)
    np.testing.assert_allclose(last, want_label, rtol=0, atol=ATOL)


@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("name", ["lstm_masked", "embedding_masked", "masked_steps"])
def test_chunks_that_start_masked_equal_one_whole_run(name: str, xla: bool) -> None:
    """At a masked step an RNN repeats its previous output, which Keras starts at zero in each
    call; a chunk that starts with masked steps (zero frames, token 0), or has nothing else,
    must answer with the carried output as one whole run does, per step and at the end."""
    if name == "masked_steps":
        inp = keras.Input((None, zoo.D))
        h = keras.layers.LSTM(6, return_sequences=True)(keras.layers.Masking(0.0)(inp))
        steps = keras.layers.Dense(2, name="steps")(h)
        label = keras.layers.Dense(3, name="label")(keras.layers.GRU(5)(h))
        model, tokens = keras.Model(inp, [steps, label]), False
    else:
        model, tokens = zoo.build(zoo.BY_NAME[name]), zoo.BY_NAME[name].tokens
    plan = build_plan(model)
    assert plan.mode is Mode.CAUSAL
    forward = Forward(plan, xla=xla)
    rng = np.random.default_rng(4)
    x = rng.integers(1, zoo.VOCAB, 14).astype(np.int32) if tokens else rng.normal(size=(14, zoo.D))
    x = x.astype(np.int32 if tokens else np.float32)
    x[5:7] = 0  # the second chunk is all masked, the third starts masked
    x[9] = 0
    states, answers = None, []
    for start, end in ((0, 5), (5, 7), (7, 9), (9, 14)):
        chunk = x[start:end]
        if xla:
            forward.compile(*forward.shape_for(1, len(chunk)))
        rows, steps = forward.shape_for(1, len(chunk))
        padded, lengths = pad_batch([chunk], plan.step_shape, plan.input_dtype, steps, rows)
        out = forward(padded, lengths, states)
        states = out.states
        answers.append([head[0, : len(chunk)] for head in out.heads])
        want = zoo.Reference(model)(x[:end])
        want = want if isinstance(want, list | tuple) else [want]
        for got, expected, spec in zip(answers[-1], want, plan.outputs, strict=True):
            if spec.per_step:  # this chunk's steps of the whole run
                expected = np.asarray(expected)[start:end]
            else:  # the answer so far, after this chunk
                got = got[-1]
            np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_a_backwards_sequence_is_batched_by_equal_lengths_only() -> None:
    """`go_backwards=True, return_sequences=True` returns its outputs in reverse time order, so
    end padding would land at the front of them: the plan falls back to equal lengths (it was
    served as exact under padding, with wrong per-step outputs for the shorter rows)."""
    inp = keras.Input((None, zoo.D))
    rnn = keras.layers.GRU(4, go_backwards=True, return_sequences=True)(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(rnn))
    plan = build_plan(model)
    assert plan.mode is Mode.EQUAL_LENGTH
    assert "go_backwards" in plan.notes[0]
    forward = Forward(plan, xla=False)
    for length in (2, 6):
        x = np.random.default_rng(length).normal(size=(length, zoo.D)).astype(np.float32)
        padded, lengths = pad_batch([x, x], plan.step_shape, plan.input_dtype, length, 2)
        out = forward(padded, lengths, None)
        [want] = zoo.Reference(model)(x)
        np.testing.assert_allclose(out.heads[0][1], want, rtol=0, atol=ATOL)


def test_speculative_compiles_wait_for_idleness_unless_traffic_needs_the_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from rnnserve.server import forward as forward_module

    monkeypatch.setattr(forward_module, "IDLE_BEFORE_SPECULATING", 3600.0)  # never idle here
    plan = build_plan(zoo.build(zoo.BY_NAME["gru_steps"]))
    forward = Forward(plan, xla=True)
    forward.compile_later(1, 100, speculative=True)
    forward.compile_later(1, 300, speculative=True)
    time.sleep(0.5)
    assert forward.shape_for(1, 300) == (1, 300)  # not compiled: the server is never idle
    for _ in range(forward_module.HOT):  # traffic makes the (1, 128) bucket hot
        forward.shape_for(1, 100)
    deadline = time.monotonic() + 60
    while forward.shape_for(1, 100) != (1, 128) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert forward.shape_for(1, 100) == (1, 128), "a hot bucket waited for idleness"
    forward.close()  # the (1, 384) speculation is dropped, not left running


def test_token_ids_are_checked_against_the_smallest_vocabulary() -> None:
    """Two Embeddings on the input (50 and 10 ids): ids 10-49 would fail in one of them (or, in
    an XLA program, be clamped silently), so the model accepts ids below 10 only."""
    inp = keras.Input((None,), dtype="int32")
    wide = keras.layers.Embedding(50, 3, mask_zero=True)(inp)
    narrow = keras.layers.Embedding(10, 3)(inp)
    out = keras.layers.Dense(2)(keras.layers.LSTM(4)(keras.layers.Add()([wide, narrow])))
    assert build_plan(keras.Model(inp, out)).vocab_size == 10
