"""Decode and validate request sequences against what a model expects.

Every refusal is an InvalidInput whose message names what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rnnserve.client.tensors import dtype_name, from_tensor
from rnnserve.server.errors import InvalidInput, ResourceExhausted
from rnnserve.server.served_model import ServedModel
from rnnserve.v1 import inference_pb2 as pb

_FLOAT_CODES = {pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT64, pb.DATA_TYPE_FLOAT16}
_INT_CODES = {pb.DATA_TYPE_INT32, pb.DATA_TYPE_INT64}


def expected_shape(model: ServedModel) -> str:
    return "[" + ", ".join(["T", *map(str, model.plan.step_shape)]) + "]"


def describe_input(model: ServedModel) -> str:
    plan = model.plan
    what = "int32 token ids" if plan.input_dtype == "int32" else "float32 features"
    return f"{what} of shape {expected_shape(model)} with 1 <= T <= {model.max_length}"


def decode_sequence(model: ServedModel, tensor: pb.Tensor, where: str) -> np.ndarray:
    """One sequence as a numpy array of the model's input dtype, or InvalidInput."""
    plan = model.plan
    token_model = plan.input_dtype == "int32"
    allowed = _INT_CODES if token_model else _FLOAT_CODES
    if tensor.dtype not in allowed:
        raise InvalidInput(
            f"{where}: expected {describe_input(model)}, got dtype {dtype_name(tensor.dtype)}"
        )
    try:
        array = from_tensor(tensor)
    except ValueError as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    if array.ndim != 1 + len(plan.step_shape) or array.shape[1:] != plan.step_shape:
        raise InvalidInput(
            f"{where}: expected {describe_input(model)}, got shape {list(array.shape)}"
        )
    length = array.shape[0]
    if length == 0:
        raise InvalidInput(f"{where}: empty sequence; expected {describe_input(model)}")
    if length > model.max_length:
        raise InvalidInput(
            f"{where}: {length} timesteps, longer than model {model.name}'s maximum "
            f"{model.max_length}"
        )
    if token_model:
        low, high = int(array.min()), int(array.max())
        vocab = plan.vocab_size
        if low < 0 or (vocab is not None and high >= vocab):
            raise InvalidInput(
                f"{where}: token ids must be in [0, {vocab}), got values from {low} to {high}"
            )
        return array.astype(np.int32, copy=False)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array.reshape(length, -1)).all(axis=1))[0])
        raise InvalidInput(f"{where}: NaN or Inf at timestep {bad}; features must be finite")
    return array.astype(np.float32, copy=False)


def decode_request(
    model: ServedModel,
    tensors: Sequence[pb.Tensor],
    *,
    max_sequences: int,
    max_timesteps: int,
) -> list[np.ndarray]:
    if not tensors:
        raise InvalidInput(
            f"no sequences in the request; expected one or more {describe_input(model)}"
        )
    if len(tensors) > max_sequences:
        raise ResourceExhausted(
            f"{len(tensors)} sequences in one request; the limit is {max_sequences}, split it"
        )
    total = sum(int(t.shape[0]) if t.shape else 0 for t in tensors)
    if total > max_timesteps:
        raise ResourceExhausted(
            f"{total} timesteps in one request; the limit is {max_timesteps}, split it"
        )
    return [decode_sequence(model, t, f"sequence {i}") for i, t in enumerate(tensors)]
