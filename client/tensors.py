"""numpy arrays <-> `rnnserve.v1.Tensor` (raw little-endian bytes, a dtype and a shape).

Shared by the client and the server, so both sides agree on one encoding.
"""

from __future__ import annotations

import math

import numpy as np

from rnnserve.v1 import inference_pb2 as pb

NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
}
_FROM_NUMPY: dict[str, int] = {dt.str[1:]: code for code, dt in NUMPY_DTYPES.items()}
_F32 = np.dtype("<f4")
# numpy's own limit. Past it a shape is no array, and the product of many huge dimensions takes
# time quadratic in their number to work out: a hostile shape is refused by its rank first.
MAX_RANK = 32
_SHOWN_DIMS = 6


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    """A shape for a message, cut short when it has many dimensions (the message goes back in
    gRPC metadata, which has a size limit, and into the log)."""
    if len(shape) <= _SHOWN_DIMS:
        return str(list(shape))
    head = ", ".join(map(str, shape[:_SHOWN_DIMS]))
    return f"[{head}, ...] ({len(shape)} dimensions)"


def dtype_name(code: int) -> str:
    """'float32' for DATA_TYPE_FLOAT32, and so on ('unspecified' for unknown codes)."""
    dt = NUMPY_DTYPES.get(code)
    return dt.name if dt is not None else "unspecified"


def dtype_code(dtype: np.dtype | str) -> int:
    """The DataType enum value for a numpy dtype; ValueError if the API has no such type."""
    dt = np.dtype(dtype)
    code = _FROM_NUMPY.get(dt.str[1:])
    if code is None:
        raise ValueError(f"dtype {dt} cannot be sent; use float32 features or int32 token ids")
    return code


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encode an array (C order, little-endian) without a per-element copy."""
    if type(array) is np.ndarray and array.dtype == _F32:  # the common case, quickly
        return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes())
    array = np.asarray(array)
    code = dtype_code(array.dtype)
    data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code])
    return pb.Tensor(dtype=code, shape=array.shape, data=data.tobytes())


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """Decode a Tensor; ValueError naming what is wrong when dtype, shape and bytes disagree."""
    dt = NUMPY_DTYPES.get(tensor.dtype)
    if dt is None:
        raise ValueError(f"unknown dtype code {tensor.dtype}")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise ValueError(f"shape {shape_text(shape)}: at most {MAX_RANK} dimensions")
    if min(shape, default=0) < 0:
        raise ValueError(f"shape {shape_text(shape)} has a negative dimension")
    data = tensor.data  # each read of a bytes field makes a new object: read it once
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise ValueError(
            f"shape {shape_text(shape)} of {dt.name} needs {expected} bytes, payload has "
            f"{len(data)}"
        )
    return np.frombuffer(data, dtype=dt).reshape(shape)
