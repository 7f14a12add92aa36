"""Property-based tests over the decoder, the batcher and the session store: random shapes,
lengths, cancellations and deadlines. Every request gets exactly one answer, good answers stay
exact, queues and session counts return to zero."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rnnserve.client.tensors import to_tensor
from rnnserve.server.batching import Batcher, BatchPolicy
from rnnserve.server.errors import DeadlineExceeded, InvalidInput, NotFound, ResourceExhausted
from rnnserve.server.forward import Forward, pad_batch
from rnnserve.server.inputs import InputSpec, decode_sequence
from rnnserve.server.plan import build_plan
from rnnserve.server.runner import RowResult
from rnnserve.server.sessions import EXPIRED, LRU, MemorySessionStore, Session
from rnnserve.v1 import inference_pb2 as pb

import zoo

# ---- decoder ----

_SPEC = InputSpec(model="m", step_shape=(3,), max_length=20)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[pb.Tensor, np.ndarray | None]:
    """A Tensor message, and the array it honestly encodes (None when it is malformed)."""
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "int32", "int64"]))
    shape = tuple(
        draw(st.lists(st.integers(0, 25), max_size=3).filter(lambda s: math.prod(s) <= 1000))
    )
    values = draw(
        st.lists(
            st.one_of(st.floats(-1e3, 1e3, width=16), st.sampled_from([np.nan, np.inf, -np.inf])),
            min_size=int(np.prod(shape)),
            max_size=int(np.prod(shape)),
        )
    )
    array = np.array(values, dtype=np.float64).reshape(shape)
    with np.errstate(invalid="ignore"):
        array = array.astype(dtype)
    tensor = to_tensor(array)
    cut = draw(st.integers(-3, 3))
    if cut:  # corrupt the payload length
        tensor.data = (
            tensor.data[: max(0, len(tensor.data) + cut)] if cut < 0 else tensor.data + b"\0" * cut
        )
        return tensor, None
    if draw(st.booleans()) and draw(st.booleans()):
        tensor.dtype = draw(st.integers(0, 9).filter(lambda code: code != tensor.dtype))
        return tensor, None
    return tensor, array


def _valid(array: np.ndarray | None) -> bool:
    """What `_SPEC` accepts: float features of shape (T, 3), 1 <= T <= 20, all finite."""
    return (
        array is not None
        and array.dtype.kind == "f"
        and array.ndim == 2
        and array.shape[1] == 3
        and 1 <= array.shape[0] <= 20
        and bool(np.isfinite(array).all())
    )


@settings(max_examples=300, deadline=None)
@given(tensors())
def test_decoder_refuses_the_invalid_sequences(
    case: tuple[pb.Tensor, np.ndarray | None],
) -> None:
    tensor, array = case
    assume(not _valid(array))  # valid ones are all but absent here; see the next test
    with pytest.raises(InvalidInput, match=r"^sequence 0: "):
        decode_sequence(_SPEC, tensor, "sequence 0")


@st.composite
def valid_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays `_SPEC` must accept: any float dtype, (T, 3) with 1 <= T <= 20, finite values that
    float32 holds exactly (so decoding must be lossless)."""
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    width = 16 if dtype is np.float16 else 32
    elements = st.floats(width=width, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(dtype, st.tuples(st.integers(1, 20), st.just(3)), elements=elements))


@settings(max_examples=200, deadline=None)
@given(valid_arrays())
def test_decoder_accepts_the_valid_sequences(array: np.ndarray) -> None:
    assert _valid(array)
    got = decode_sequence(_SPEC, to_tensor(array), "sequence 0")
    assert got.dtype == np.float32
    assert got.shape == array.shape
    np.testing.assert_array_equal(got.astype(np.float64), array.astype(np.float64))


def test_integer_inputs_without_an_embedding_are_values_not_ids() -> None:
    """Token ids are checked against the Embedding's vocabulary; an integer input no Embedding
    reads is a number, negative ones included (they were refused as "token ids")."""
    values = InputSpec(model="m", step_shape=(), max_length=20, tokens=True)
    assert "int32 values" in values.description
    x = np.array([-5, 0, 7], np.int32)
    np.testing.assert_array_equal(decode_sequence(values, to_tensor(x), "sequence 0"), x)
    with pytest.raises(InvalidInput, match=r"int32 values must be in \[-2147483648, 2147483648\)"):
        decode_sequence(values, to_tensor(np.array([1, 2**40], np.int64)), "sequence 0")
    ids = InputSpec(model="m", step_shape=(), max_length=20, tokens=True, vocab_size=30)
    with pytest.raises(InvalidInput, match=r"token ids must be in \[0, 30\), got values from -5"):
        decode_sequence(ids, to_tensor(x), "sequence 0")


# ---- batcher ----


class EchoRunner:
    """Returns each sequence's sum: every answer can be matched to its request."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.computed: list[int] = []
        self.gate = threading.Event()

    def run(
        self,
        sequences: Sequence[np.ndarray],
        states: Sequence[object],
        cells: list[int] | None = None,
    ) -> list[RowResult]:
        self.gate.wait(5)
        self.batches.append([len(x) for x in sequences])
        self.computed.extend(int(x[0, 0]) for x in sequences)  # each request's index
        return [RowResult([np.array([x.sum()])], [False], []) for x in sequences]

    def padded_length(self, lengths: Sequence[int]) -> int:
        return max(lengths)


requests = st.lists(
    st.tuples(
        st.integers(1, 60),  # length
        st.sampled_from(["keep", "cancel", "expire"]),
        st.booleans(),  # a session chunk
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.integers(1, 8), st.integers(20, 200), st.booleans())
def test_batcher_answers_everything_once(
    reqs: list[tuple[int, str, bool]], rows: int, cells: int, equal: bool
) -> None:
    runner = EchoRunner()
    policy = BatchPolicy(
        max_batch_size=rows, max_batch_timesteps=cells, max_queue=30, equal_lengths_only=equal
    )
    batcher = Batcher(runner, policy)  # type: ignore[arg-type]
    session = object()

    kept: list[int] = []  # requests that must be computed, each exactly once

    async def main() -> None:
        loop = asyncio.get_running_loop()
        submitted = []
        for i, (length, fate, chunk) in enumerate(reqs):
            x = np.full((length, 2), float(i), np.float32)
            deadline = loop.time() - 1 if fate == "expire" else loop.time() + 60
            try:
                future = batcher.submit_nowait(
                    x, deadline=deadline, session=session if chunk else None
                )
            except ResourceExhausted:
                assert batcher.queue_depth >= 30
                continue
            if fate == "cancel":
                future.cancel()
            elif fate == "keep":
                kept.append(i)
            submitted.append((future, fate, float(x.sum())))
        runner.gate.set()
        for future, fate, total in submitted:
            if fate == "cancel":
                continue
            try:
                result = await asyncio.wait_for(future, 10)
            except DeadlineExceeded:
                assert fate == "expire"
                continue
            assert fate != "expire", "work past its deadline was computed"
            assert float(result.heads[0][0]) == total
        await batcher.close()

    asyncio.run(main())
    # Cancelled and expired work was dropped before compute; kept work ran once.
    assert sorted(runner.computed) == kept
    assert batcher.queue_depth == 0
    assert not batcher.busy
    for lengths in runner.batches:
        assert len(lengths) <= rows
        assert len(lengths) == 1 or max(lengths) * len(lengths) <= cells
        if equal:
            assert len(set(lengths)) == 1


# ---- exactness of the forward under random length mixes ----


@functools.cache
def _model() -> tuple[Any, Any, Any]:
    arch = zoo.BY_NAME["multi_output"]
    model = zoo.build(arch)
    plan = build_plan(model)
    return arch, Forward(plan, xla=False), zoo.Reference(model)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 24), min_size=1, max_size=10), st.integers(0, 2**32 - 1))
def test_any_length_mix_is_exact(lengths: list[int], seed: int) -> None:
    arch, forward, reference = _model()
    xs = zoo.sequences(arch, lengths, np.random.default_rng(seed))
    x, lens = pad_batch(xs, forward.plan.step_shape, forward.plan.input_dtype)
    out = forward(x, lens)
    for row, seq in enumerate(xs):
        tags, label = reference(seq)
        np.testing.assert_allclose(out.heads[0][row, : len(seq)], tags, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.heads[1][row, len(seq) - 1], label, atol=1e-5, rtol=0)


# ---- session store ----


class SessionStoreMachine(RuleBasedStateMachine):
    """The store against a plain model of it, under a fake clock."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[tuple[str, str]] = []
        self.store = MemorySessionStore(
            ttl=10.0,
            max_sessions=4,
            overflow="evict",
            on_end=lambda s, why: self.ended.append((s.id, why)),
            clock=lambda: self.now,
        )
        self.now = 1000.0
        self.model: OrderedDict[str, float] = OrderedDict()  # id -> last use, least recent first
        self.counter = 0

    def _fresh(self) -> None:
        """Sessions idle past the TTL are gone from the model too (the store sweeps lazily)."""
        for sid, last in list(self.model.items()):
            if self.now - last > 10.0:
                del self.model[sid]

    @rule()
    def add(self) -> None:
        self.counter += 1
        sid = f"s{self.counter}"
        self._fresh()
        self.store.expire(self.now)
        if len(self.model) >= 4:
            self.model.popitem(last=False)
        session = Session(sid, "m", 1, 0, b"", self.now)
        self.store.add(session)
        self.model[sid] = self.now

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def use(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self._fresh()
        self.store.expire(self.now)
        if sid in self.model:
            assert self.store.get(sid).last_used == self.now
            self.model[sid] = self.now
            self.model.move_to_end(sid)
        else:
            with pytest.raises(NotFound, match=r"expired|evicted"):
                self.store.get(sid)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.store.remove(sid)
        del self.model[sid]

    @rule(seconds=st.floats(0.1, 8.0))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def bounded_and_consistent(self) -> None:
        self.store.expire(self.now)
        self._fresh()
        assert len(self.store) <= 4
        assert [s.id for s in self.store] == list(self.model)  # same members, same LRU order
        reasons = {why for _, why in self.ended}
        assert reasons <= {EXPIRED, LRU, "closed"}


TestSessionStore = SessionStoreMachine.TestCase
TestSessionStore.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
