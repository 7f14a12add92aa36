"""The compiled forward pass: a padded batch, true lengths and initial states in; outputs and final
states out. One `tf.function` with `None` batch and time dimensions serves every request shape, so
nothing retraces per request. A plain request is a session step that starts from zero state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from rnnserve.server.plan import Mode, Plan, PlanStep, Role


@dataclass
class BatchResult:
    """Outputs of one batch. `heads[h]` is [B, T, ...] when `stepped[h]`, else [B, ...]."""

    heads: list[np.ndarray]
    stepped: list[bool]
    states: list[np.ndarray]  # one [B, size] array per state tensor (empty unless CAUSAL)


def pad_batch(
    sequences: Sequence[np.ndarray], step_shape: tuple[int, ...], dtype: str, length: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Post-pad `sequences` with zeros to one [B, T, ...] array; T is the longest (or `length`)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    padded = np.zeros((len(sequences), max(int(lengths.max()), length), *step_shape), dtype=dtype)
    for row, seq in enumerate(sequences):
        padded[row, : len(seq)] = seq
    return padded, lengths


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

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._dtype = tf.dtypes.as_dtype(plan.input_dtype)
        state_specs = tuple(tf.TensorSpec([None, size], tf.float32) for size in plan.state_sizes)
        self._signature = (tf.TensorSpec([None], tf.int32), state_specs)
        self._traced: dict[int, Any] = {}  # EQUAL_LENGTH: one trace per sequence length
        if plan.mode is not Mode.EQUAL_LENGTH:
            x_spec = tf.TensorSpec([None, None, *plan.step_shape], self._dtype)
            self._fn = tf.function(self._run_plan, input_signature=[x_spec, *self._signature])
        self.stepped = [o.per_step or plan.mode is Mode.CAUSAL for o in plan.outputs]

    def __call__(
        self, x: np.ndarray, lengths: np.ndarray, states: Sequence[np.ndarray] | None = None
    ) -> BatchResult:
        if states is None:
            states = [np.zeros((len(x), size), np.float32) for size in self.plan.state_sizes]
        fn = self._fn if self.plan.mode is not Mode.EQUAL_LENGTH else self._for_length(x.shape[1])
        heads, new_states = fn(x, lengths, tuple(states))
        return BatchResult(
            heads=[h.numpy() for h in heads],
            stepped=self.stepped,
            states=[s.numpy() for s in new_states],
        )

    def _for_length(self, length: int) -> Any:
        # Unproven models get a static time dimension: some Keras layers (TimeDistributed among
        # them) compute wrong shapes when time is unknown while tracing.
        fn = self._traced.get(length)
        if fn is None:
            x_spec = tf.TensorSpec([None, length, *self.plan.step_shape], self._dtype)
            fn = tf.function(self._run_model).get_concrete_function(x_spec, *self._signature)
            self._traced[length] = fn
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
            sequence, *final = step.layer(
                arg,
                mask=_and(mask, length_mask),
                initial_state=list(states[first : first + count]),
                training=False,
            )
            new_states[first : first + count] = final
            return sequence
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
