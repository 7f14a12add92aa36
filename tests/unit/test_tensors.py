from __future__ import annotations

import numpy as np
import pytest

from rnnserve.client.tensors import from_tensor, to_tensor
from rnnserve.v1 import inference_pb2 as pb


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64"])
def test_round_trip(dtype: str) -> None:
    x = (np.arange(24).reshape(4, 6) * 1.5).astype(dtype)
    y = from_tensor(to_tensor(x))
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)


def test_non_contiguous_and_big_endian_inputs_are_normalised() -> None:
    x = np.arange(20, dtype=">f4").reshape(4, 5)[:, ::2]
    y = from_tensor(to_tensor(x))
    np.testing.assert_array_equal(y, x.astype("<f4"))


def test_size_mismatch_is_named() -> None:
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[3, 4], data=b"\0" * 40)
    with pytest.raises(ValueError, match="needs 48 bytes, payload has 40"):
        from_tensor(t)


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        to_tensor(np.zeros(3, dtype=bool))


def test_a_shape_of_many_huge_dimensions_is_refused_by_its_rank() -> None:
    """Its size would have more than 4,300 digits (Python refuses to print it) and takes time
    quadratic in the rank to work out; the message shows the start of the shape only."""
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2**62] * 1000, data=b"")
    with pytest.raises(ValueError, match=r"\(1000 dimensions\): at most 32 dimensions") as refused:
        from_tensor(t)
    assert len(str(refused.value)) < 200
