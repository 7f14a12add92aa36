"""Decode and validate request sequences against what a model expects.

Every refusal is an InvalidInput whose message names what was expected and what came. Decoding runs
on the event loop for every sequence, so what can be worked out once per model is, in `InputSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rnnserve.client.tensors import NUMPY_DTYPES, dtype_name, shape_text
from rnnserve.server.errors import InvalidInput, ResourceExhausted
from rnnserve.v1 import inference_pb2 as pb

_FLOAT_CODES = frozenset({pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT64, pb.DATA_TYPE_FLOAT16})
_INT_CODES = frozenset({pb.DATA_TYPE_INT32, pb.DATA_TYPE_INT64})
_F32 = NUMPY_DTYPES[pb.DATA_TYPE_FLOAT32]
_I32 = NUMPY_DTYPES[pb.DATA_TYPE_INT32]
_INT32_END = 2**31


@dataclass(frozen=True)
class InputSpec:
    """What one model version accepts: [T, *step_shape] float features, or [T] token ids."""

    model: str
    step_shape: tuple[int, ...]
    max_length: int
    tokens: bool = False  # int32 token ids (an Embedding model) instead of float features
    vocab_size: int | None = None
    codes: frozenset[int] = field(init=False)
    rank: int = field(init=False)
    description: str = field(init=False)

    def __post_init__(self) -> None:
        shape = "[" + ", ".join(["T", *map(str, self.step_shape)]) + "]"
        what = (
            "float32 features"
            if not self.tokens
            else "int32 token ids"
            if self.vocab_size is not None
            else "int32 values"
        )
        object.__setattr__(self, "codes", _INT_CODES if self.tokens else _FLOAT_CODES)
        object.__setattr__(self, "rank", 1 + len(self.step_shape))
        object.__setattr__(
            self, "description", f"{what} of shape {shape} with 1 <= T <= {self.max_length}"
        )


def decode_sequence(spec: InputSpec, tensor: pb.Tensor, where: str) -> np.ndarray:
    """One sequence as a numpy array of the model's input dtype, or InvalidInput."""
    code = tensor.dtype
    if code not in spec.codes:
        raise InvalidInput(f"{where}: expected {spec.description}, got dtype {dtype_name(code)}")
    dtype = NUMPY_DTYPES[code]
    shape = tuple(tensor.shape)
    # The rank first: the size of a shape of many huge dimensions takes long to work out.
    if len(shape) != spec.rank or shape[1:] != spec.step_shape:
        raise InvalidInput(f"{where}: expected {spec.description}, got shape {shape_text(shape)}")
    length = shape[0]
    if length < 0:
        raise InvalidInput(f"{where}: shape {list(shape)} has a negative dimension")
    data = tensor.data
    needed = math.prod(shape) * dtype.itemsize
    if len(data) != needed:
        raise InvalidInput(
            f"{where}: shape {list(shape)} of {dtype.name} needs {needed} bytes, payload has "
            f"{len(data)}"
        )
    if length == 0:
        raise InvalidInput(f"{where}: empty sequence; expected {spec.description}")
    if length > spec.max_length:
        raise InvalidInput(
            f"{where}: {length} timesteps, longer than model {spec.model}'s maximum "
            f"{spec.max_length}"
        )
    array = np.frombuffer(data, dtype).reshape(shape)
    if spec.tokens:
        low, high = int(array.min()), int(array.max())
        if spec.vocab_size is not None:  # ids an Embedding looks up (XLA would clamp the rest)
            what, start, end = "token ids", 0, spec.vocab_size
        else:  # integer inputs without an Embedding: any int32
            what, start, end = "int32 values", -_INT32_END, _INT32_END
        if low < start or high >= end:
            raise InvalidInput(
                f"{where}: {what} must be in [{start}, {end}), got values from {low} to {high}"
            )
        return array if dtype is _I32 else array.astype(_I32)
    if dtype is not _F32:
        with np.errstate(over="ignore"):  # out of float32's range: caught as Inf just below
            array = array.astype(_F32)
    if not np.isfinite(array).all():
        rows = array.reshape(length, -1)
        bad = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        raise InvalidInput(f"{where}: NaN or Inf at timestep {bad}; features must be finite")
    return array


def check_request_size(
    spec: InputSpec, tensors: Sequence[pb.Tensor], *, max_sequences: int, max_timesteps: int
) -> None:
    """Refuse a request over the per-request limits before anything else, so that it gets no
    retry hint for a full queue: waiting cannot make it fit."""
    count = len(tensors)
    if count == 1:  # the common case: no totals to add up
        shape = tensors[0].shape
        if shape and shape[0] > max_timesteps and _claimed(tensors[0]):
            raise ResourceExhausted(
                f"{shape[0]} timesteps in one request; the limit is {max_timesteps}, split it"
            )
        return
    if not count:
        raise InvalidInput(f"no sequences in the request; expected one or more {spec.description}")
    if count > max_sequences:
        raise ResourceExhausted(
            f"{count} sequences in one request; the limit is {max_sequences}, split it"
        )
    total = sum(int(t.shape[0]) if t.shape else 0 for t in tensors)
    if total > max_timesteps:
        total = sum(_claimed(t) for t in tensors)
    if total > max_timesteps:
        raise ResourceExhausted(
            f"{total} timesteps in one request; the limit is {max_timesteps}, split it"
        )


def _claimed(tensor: pb.Tensor) -> int:
    """The timesteps a tensor claims, if its payload could hold them (one element each at
    least); else 0: decoding refuses it then, for its payload, not for the request's size."""
    length = int(tensor.shape[0]) if tensor.shape else 0
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    return length if dtype is not None and len(tensor.data) >= length * dtype.itemsize else 0


def decode_request(spec: InputSpec, tensors: Sequence[pb.Tensor]) -> list[np.ndarray]:
    """Every sequence of a request that passed `check_request_size`."""
    return [decode_sequence(spec, t, f"sequence {i}") for i, t in enumerate(tensors)]
