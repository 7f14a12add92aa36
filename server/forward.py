"""The compiled forward pass: a padded batch, true lengths and initial states in; outputs and final
states out. A plain request is a session step that starts from zero state.

Two compiled forms. A graph `tf.function` with `None` batch and time dimensions serves any shape at
once, so nothing retraces per request. On top of it, XLA programs compiled per shape *bucket* (rows
rounded up to 1, 4, 16, 64, ..., timesteps to 1, 2, 4, ..., 64, 96, 128, 192, ...) run the
recurrent loop several times faster on CPU: batches are padded further to their bucket (extra rows
have length 0; the length mask keeps padding out of every real row). A bucket is compiled in the
background once it has been seen a few times (so one-off shapes cost no compile), and the graph
function answers until it is ready, so no request waits for a compiler.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from rnnserve.server.plan import Mode, Plan, PlanStep, Role

log = logging.getLogger(__name__)

# Few buckets where sequences are short (each costs a compile; a padded step is cheap there), finer
# steps (x1.5) above 64 so that long sequences waste at most a third.
_LADDER = sorted({2**k for k in range(21)} | {3 * 2**k for k in range(5, 20)})
# A bucket is compiled once this many batches have fallen into it.
HOT = 3
# One compiler thread for all models: compiling is CPU-heavy and never urgent.
_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xla")
# Speculative compiles (shapes no request has asked for yet) run on their own thread, and only once
# no batch of any model has started for IDLE_BEFORE_SPECULATING seconds: they must not take CPU
# from the first requests after a model loads.
_SPECULATOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xla-idle")
IDLE_BEFORE_SPECULATING = 5.0
# Graph traces kept per EQUAL_LENGTH model, one per sequence length (least recently used dropped).
MAX_TRACES = 64
_last_batch = time.monotonic()  # when the latest batch of any model started (or the import)


def bucket_length(steps: int) -> int:
    return _LADDER[bisect.bisect_left(_LADDER, steps)] if steps <= _LADDER[-1] else steps


def bucket_rows(rows: int, most: int) -> int:
    """Powers of four up to the batch limit: a padded row costs little next to a compile."""
    bucket = 1
    while bucket < rows:
        bucket *= 4
    return min(bucket, max(most, rows))


@dataclass
class BatchResult:
    """Outputs of one batch. `heads[h]` is [B, T, ...] when `stepped[h]`, else [B, ...]."""

    heads: list[np.ndarray]
    stepped: list[bool]
    states: list[np.ndarray]  # one [B, size] array per state tensor (empty unless CAUSAL)


def pad_batch(
    sequences: Sequence[np.ndarray],
    step_shape: tuple[int, ...],
    dtype: str,
    length: int = 0,
    rows: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Post-pad `sequences` with zeros to one [B, T, ...] array: T is the longest (or `length`),
    B their number (or `rows`: extra rows have length 0)."""
    count = len(sequences)
    lengths = np.zeros(max(rows, count), dtype=np.int32)
    lengths[:count] = [len(s) for s in sequences]
    padded = np.zeros((len(lengths), max(int(lengths.max()), length), *step_shape), dtype=dtype)
    for row, seq in enumerate(sequences):
        padded[row, : len(seq)] = seq
    return padded, lengths


def _invoke(fn: Any, flat: list[np.ndarray], n_states: int) -> Any:
    """Call a concrete function on flat numpy inputs: x, lengths, then the state tensors.

    The batch thread runs Python under the GIL that the event loop needs too, and TensorFlow's
    structured call path (binding and checking arguments) costs more than the compute of a small
    batch; the flat call skips it. Falls back to the public call if the private one changes."""
    call_flat = getattr(fn, "_call_flat", None)
    if call_flat is not None:
        tensors = [a if isinstance(a, tf.Tensor) else tf.constant(a) for a in flat]
        return call_flat(tensors, fn.captured_inputs)
    return fn(flat[0], flat[1], tuple(flat[2 : 2 + n_states]))


def _and(mask: Any, length_mask: tf.Tensor) -> tf.Tensor:
    return length_mask if mask is None else tf.logical_and(tf.cast(mask, tf.bool), length_mask)


def _bare(value: Any) -> Any:
    """`value` without a Keras mask attached, so a layer sees only the mask we pass it."""
    if isinstance(value, list):
        return [_bare(v) for v in value]
    return tf.identity(value) if getattr(value, "_keras_mask", None) is not None else value


def _per_step(layer: Any, value: Any) -> tf.Tensor:
    """Apply a layer written for one vector per sequence to every step's vector: [B, T, ...]."""
    lead = tf.shape(value[0] if isinstance(value, list) else value)[:2]

    def flat(v: tf.Tensor) -> tf.Tensor:
        return tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], axis=0))

    out = layer(
        [flat(v) for v in value] if isinstance(value, list) else flat(value), training=False
    )
    return tf.reshape(out, tf.concat([lead, tf.shape(out)[1:]], axis=0))


class Forward:
    """Runs a `Plan` on padded numpy batches."""

    def __init__(
        self, plan: Plan, *, xla: bool = True, max_rows: int = 64, max_traces: int = MAX_TRACES
    ) -> None:
        self.plan = plan
        self._dtype = tf.dtypes.as_dtype(plan.input_dtype)
        state_specs = tuple(tf.TensorSpec([None, size], tf.float32) for size in plan.state_sizes)
        self._signature = (tf.TensorSpec([None], tf.int32), state_specs)
        # EQUAL_LENGTH: one trace per sequence length, least recently used first (see _for_length)
        self._traced: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._traced_lock = threading.Lock()
        self._max_traces = max_traces
        self.stepped = [o.per_step or plan.mode is Mode.CAUSAL for o in plan.outputs]
        self.xla = xla and plan.mode is not Mode.EQUAL_LENGTH
        if plan.mode is not Mode.EQUAL_LENGTH:
            spec = [tf.TensorSpec([None, None, *plan.step_shape], self._dtype), *self._signature]
            self._graph_concrete = tf.function(
                self._run_plan, input_signature=spec
            ).get_concrete_function()
        if self.xla:
            # Traced once, like the graph; XLA then compiles per input shape in C++, without
            # holding the GIL, and caches each compiled shape.
            self._xla_fn = tf.function(self._run_plan, input_signature=spec, jit_compile=True)
            self._xla_concrete = self._xla_fn.get_concrete_function()
        self._max_rows = max_rows
        self._ready: set[tuple[int, int]] = set()  # buckets XLA has compiled
        self._compiling: set[tuple[int, int]] = set()
        self._speculative: set[tuple[int, int]] = set()  # waiting for the server to be idle
        self._seen: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._zeros: dict[int, list[Any]] = {}
        self._queued: set[concurrent.futures.Future[None]] = set()  # background compiles
        self._closed = threading.Event()

    def shape_for(self, rows: int, steps: int) -> tuple[int, int]:
        """The [rows, steps] to pad a batch to: its bucket once XLA has compiled it, else its own
        shape (for the graph function). Counts the bucket as seen, compiling it once hot."""
        if not self.xla:
            return rows, steps
        key = self.bucket(rows, steps)
        if key in self._ready:
            return key
        with self._lock:
            seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen >= HOT:
            self.compile_later(rows, steps)
        return rows, steps

    def __call__(
        self,
        x: np.ndarray,
        lengths: np.ndarray,
        states: Sequence[Any] | None = None,
        *,
        final_states: bool = True,
    ) -> BatchResult:
        """Run a padded batch. Rows and steps beyond the real ones are padding (length 0 rows);
        outputs keep the batch's shape. `final_states=False` skips copying out the final states
        (plain requests throw them away)."""
        global _last_batch
        _last_batch = time.monotonic()
        rows, steps = x.shape[:2]
        if states is None:
            states = self._zero_states(rows)
        if self.plan.mode is Mode.EQUAL_LENGTH:
            fn = self._for_length(steps)
        else:
            fn = self._xla_concrete if (rows, steps) in self._ready else self._graph_concrete
        heads, new_states = _invoke(fn, [x, lengths, *states], len(states))
        return BatchResult(
            heads=[h.numpy() for h in heads],
            stepped=self.stepped,
            states=[s.numpy() for s in new_states] if final_states else [],
        )

    def _zero_states(self, rows: int) -> list[Any]:
        """Zero initial states as ready tensors, made once per batch size."""
        zeros = self._zeros.get(rows)
        if zeros is None:
            zeros = [tf.zeros((rows, size), tf.float32) for size in self.plan.state_sizes]
            self._zeros[rows] = zeros
        return zeros

    # ---- XLA compilation per shape bucket ----

    def bucket(self, rows: int, steps: int) -> tuple[int, int]:
        return bucket_rows(rows, self._max_rows), bucket_length(steps)

    def compile(self, rows: int, steps: int) -> None:
        """Compile the bucket of this shape now (warm-up)."""
        if self.xla and self.bucket(rows, steps) not in self._ready:
            self._compile(self.bucket(rows, steps))

    def compile_later(self, rows: int, steps: int, *, speculative: bool = False) -> None:
        """Compile the bucket of this shape in the background: soon, or (speculative) once the
        server is idle. A bucket that traffic makes hot while it waits to be speculated on is
        compiled soon all the same."""
        key = self.bucket(rows, steps)
        with self._lock:
            if not self.xla or key in self._ready or key in self._compiling:
                return
            if speculative:
                if key in self._speculative:
                    return
                self._speculative.add(key)
            else:
                self._compiling.add(key)
            job = (_SPECULATOR if speculative else _COMPILER).submit(
                self._compile_quietly, key, speculative
            )
            self._queued.add(job)
            job.add_done_callback(self._queued.discard)

    def close(self) -> None:
        """Drop the background compiles not started yet (the model is unloading)."""
        self._closed.set()
        for job in list(self._queued):
            job.cancel()

    def _compile_quietly(self, key: tuple[int, int], speculative: bool = False) -> None:
        if speculative:
            while (idle := time.monotonic() - _last_batch) < IDLE_BEFORE_SPECULATING:
                if self._closed.wait(IDLE_BEFORE_SPECULATING - idle):
                    return
            with self._lock:
                self._speculative.discard(key)
                if key in self._ready or key in self._compiling:
                    return  # compiled meanwhile, or being compiled because traffic needs it
                self._compiling.add(key)
        try:
            if not self._closed.is_set():
                self._compile(key)
        except Exception as exc:  # the graph function keeps answering for this bucket
            log.warning("XLA compile of bucket %s failed, staying on the graph: %s", key, exc)
        finally:
            with self._lock:
                self._compiling.discard(key)

    def _compile(self, key: tuple[int, int]) -> None:
        rows, steps = key
        x = np.zeros((rows, steps, *self.plan.step_shape), self._dtype.as_numpy_dtype)
        states = tuple(np.zeros((rows, s), np.float32) for s in self.plan.state_sizes)
        self._xla_fn(x, np.zeros(rows, np.int32), states)  # compiles and caches this shape
        self._ready.add(key)

    def _for_length(self, length: int) -> Any:
        # Unproven models get a static time dimension: some Keras layers (TimeDistributed among
        # them) compute wrong shapes when time is unknown while tracing.
        # Each trace is a whole graph and a model may see every length up to max_length, so only
        # the most recently used `max_traces` are kept; a dropped length is traced again if it
        # comes back. The batcher's worker threads call this concurrently: the lock keeps the
        # OrderedDict consistent; tracing runs outside it (two threads may trace the same length
        # at once, and the last one is kept).
        with self._traced_lock:
            fn = self._traced.get(length)
            if fn is not None:
                self._traced.move_to_end(length)
                return fn
        x_spec = tf.TensorSpec([None, length, *self.plan.step_shape], self._dtype)
        fn = tf.function(self._run_model).get_concrete_function(x_spec, *self._signature)
        with self._traced_lock:
            self._traced[length] = fn
            self._traced.move_to_end(length)
            while len(self._traced) > self._max_traces:
                self._traced.popitem(last=False)
        return fn

    def _run_model(
        self, x: tf.Tensor, lengths: tf.Tensor, states: tuple[tf.Tensor, ...]
    ) -> tuple[tuple[tf.Tensor, ...], tuple[tf.Tensor, ...]]:
        outputs = self.plan.model(x, training=False)
        if not isinstance(outputs, list | tuple):
            outputs = (outputs,)
        return tuple(outputs), ()

    def _run_plan(
        self, x: tf.Tensor, lengths: tf.Tensor, states: tuple[tf.Tensor, ...]
    ) -> tuple[tuple[tf.Tensor, ...], tuple[tf.Tensor, ...]]:
        plan = self.plan
        length_mask = tf.sequence_mask(lengths, tf.shape(x)[1])
        values: dict[int, Any] = {plan.input_key: x}
        masks: dict[int, Any] = {plan.input_key: None}
        new_states: list[tf.Tensor] = [tf.zeros([0])] * len(states)
        for step in plan.steps:
            arg = [values[k] for k in step.inputs]
            mask = [masks[k] for k in step.inputs]
            if not step.merge:
                arg, mask = arg[0], mask[0]
            out = self._call(step, _bare(arg), mask, length_mask, states, new_states)
            out_mask = (
                step.original.compute_mask(arg, mask) if step.original.supports_masking else None
            )
            for key, value in zip(step.outputs, tf.nest.flatten(out), strict=True):
                values[key] = value
                masks[key] = out_mask
        heads = tuple(values[k] for k in plan.output_keys)
        return heads, tuple(new_states)

    def _call(
        self,
        step: PlanStep,
        arg: Any,
        mask: Any,
        length_mask: tf.Tensor,
        states: tuple[tf.Tensor, ...],
        new_states: list[tf.Tensor],
    ) -> Any:
        if step.role is Role.RECURRENT:
            first, count = step.state_start, step.state_count
            step_mask = _and(mask, length_mask)
            sequence, *final = step.layer(
                arg,
                mask=step_mask,
                initial_state=list(states[first : first + count]),
                training=False,
            )
            new_states[first : first + count] = final
            if getattr(step.layer, "zero_output_for_mask", False):
                return sequence
            # A masked step repeats the previous output, which Keras starts at zero in every
            # call; in a session's chunk it is the carried h (the output of LSTM, GRU and
            # SimpleRNN alike), which is what one whole run gives before the first real step.
            seen = tf.cumsum(tf.cast(step_mask, tf.int32), axis=1) > 0
            return tf.where(seen[..., None], sequence, states[first][:, None, :])
        if step.role is Role.MASKED_RECURRENT:
            return step.layer(arg, mask=_and(mask, length_mask), training=False)
        if step.role is Role.SAMPLEWISE and self.plan.mode is Mode.CAUSAL:
            return _per_step(step.layer, arg)
        if isinstance(step.layer, keras.layers.TimeDistributed):
            # The wrapped layer on [B*T, ...] at once: Keras' own TimeDistributed mixes up batch
            # and time when the time dimension is unknown while tracing.
            return _per_step(step.layer.layer, arg)
        if step.takes_mask and mask is not None:
            return step.layer(arg, mask=mask, training=False)
        return step.layer(arg, training=False)
