"""Bad input gets a clear status and a message naming what was expected; the good requests
in flight with it still get their exact answers."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client
from rnnserve.client.tensors import to_tensor
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

import zoo

FLOAT_MODEL, TOKEN_MODEL, FIXED_MODEL = "lstm_masked", "embedding_masked", "fixed_length"
D = zoo.D


def _raw(tensor: pb.Tensor, model: str = FLOAT_MODEL, **fields: Any) -> pb.PredictRequest:
    return pb.PredictRequest(model_name=model, sequences=[tensor], **fields)


def _float(x: np.ndarray) -> pb.Tensor:
    return to_tensor(np.asarray(x, dtype=np.float32))


def _nan() -> np.ndarray:
    x = np.ones((5, D), np.float32)
    x[3, 2] = np.nan
    return x


BAD: list[tuple[str, pb.PredictRequest, grpc.StatusCode, list[str]]] = [
    (
        "wrong feature dim",
        _raw(_float(np.ones((4, D + 1)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["expected float32 features of shape [T, 6]", f"got shape [4, {D + 1}]"],
    ),
    (
        "wrong rank",
        _raw(_float(np.ones((2, 4, D)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["shape [T, 6]", "got shape [2, 4, 6]"],
    ),
    (
        "wrong dtype",
        _raw(to_tensor(np.ones((4, D), np.int32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["expected float32 features", "got dtype int32"],
    ),
    (
        "float ids for a token model",
        _raw(_float(np.ones(4)), TOKEN_MODEL),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["expected int32 token ids", "got dtype float32"],
    ),
    (
        "token id out of vocabulary",
        _raw(to_tensor(np.array([1, 2, zoo.VOCAB], np.int32)), TOKEN_MODEL),
        grpc.StatusCode.INVALID_ARGUMENT,
        [f"token ids must be in [0, {zoo.VOCAB})", f"got values from 1 to {zoo.VOCAB}"],
    ),
    (
        "NaN",
        _raw(_float(_nan())),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["NaN or Inf at timestep 3", "finite"],
    ),
    (
        "Inf",
        _raw(_float(np.full((2, D), np.inf))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["NaN or Inf at timestep 0"],
    ),
    (
        "zero-length",
        _raw(_float(np.ones((0, D)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["empty sequence", "1 <= T"],
    ),
    (
        "longer than the model's fixed length",
        _raw(_float(np.ones((zoo.FIXED_T + 1, D))), FIXED_MODEL),
        grpc.StatusCode.INVALID_ARGUMENT,
        [f"{zoo.FIXED_T + 1} timesteps", f"maximum {zoo.FIXED_T}"],
    ),
    (
        "payload size not matching the shape",
        _raw(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[3, D], data=b"\0" * (4 * 3 * D - 4))),
        grpc.StatusCode.INVALID_ARGUMENT,
        [f"needs {4 * 3 * D} bytes, payload has {4 * 3 * D - 4}"],
    ),
    (
        "unknown dtype code",
        _raw(pb.Tensor(dtype=42, shape=[1, D], data=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["expected float32 features", "got dtype unspecified"],
    ),
    (
        # The size of such a shape takes time quadratic in its rank to work out (a 720 KB
        # request held the event loop for 12 s), and its message would be huge: refused by rank.
        "many huge dimensions",
        _raw(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[10] + [2**62] * 3000, data=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["expected float32 features of shape [T, 6]", "(3001 dimensions)"],
    ),
    (
        "a shape its payload cannot hold (not a request too large)",
        _raw(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2**40, D], data=b"\0" * 480)),
        grpc.StatusCode.INVALID_ARGUMENT,
        [f"needs {2**40 * D * 4} bytes, payload has 480"],
    ),
    (
        "an output named twice",
        _raw(_float(np.ones((3, D))), "multi_output", output_names=["label", "label"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["output 'label' is named twice"],
    ),
    (
        # Each distinct list of names was kept in a per-model cache: 500,000 names, ~80 MB each.
        "more output names than the model has outputs",
        pb.PredictRequest(model_name=FLOAT_MODEL, output_names=["label"] * 500_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["500000 output names for model lstm_masked, which has 1 outputs"],
    ),
    (
        # Echoed whole, it made the status larger than gRPC's metadata limit.
        "a model name of 100,000 characters",
        _raw(_float(np.ones((3, D))), "m" * 100_000),
        grpc.StatusCode.NOT_FOUND,
        ["is not served", "... (100000 characters)"],
    ),
    (
        "no sequences",
        pb.PredictRequest(model_name=FLOAT_MODEL),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["no sequences in the request"],
    ),
    (
        "unknown model",
        _raw(_float(np.ones((3, D))), "no_such_model"),
        grpc.StatusCode.NOT_FOUND,
        ["model 'no_such_model' is not served", "models served:", FLOAT_MODEL],
    ),
    (
        "unknown version",
        _raw(_float(np.ones((3, D))), model_version=7),
        grpc.StatusCode.NOT_FOUND,
        ["has no version 7 ready", "ready versions: 1"],
    ),
    (
        "unknown output name",
        _raw(_float(np.ones((3, D))), output_names=["nope"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["has no output 'nope'", "its outputs are label"],
    ),
    (
        "per-step output of a non-causal many-to-one model",
        _raw(_float(np.ones((3, D))), "bidirectional", output_mode=pb.OUTPUT_MODE_STEPS),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["one per sequence and the model is not causal", "OUTPUT_MODE_SEQUENCE"],
    ),
    (
        "unknown output mode",
        _raw(_float(np.ones((3, D))), output_mode=9),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["unknown output_mode 9"],
    ),
    (
        "negative top_k",
        _raw(_float(np.ones((3, D))), top_k=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["top_k must be >= 0"],
    ),
    (
        "one bad sequence among good ones",
        pb.PredictRequest(
            model_name=FLOAT_MODEL,
            sequences=[
                _float(np.ones((3, D))),
                _float(np.ones((3, D - 1))),
                _float(np.ones((2, D))),
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["sequence 1:", "got shape [3, 5]"],
    ),
]


@pytest.mark.parametrize(("case", "request_", "code", "phrases"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_status(
    zoo_server: Any,
    case: str,
    request_: pb.PredictRequest,
    code: grpc.StatusCode,
    phrases: list[str],
) -> None:
    with grpc.insecure_channel(zoo_server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request_, timeout=30)
    assert err.value.code() == code, err.value.details()
    for phrase in phrases:
        assert phrase in err.value.details(), f"{case}: {err.value.details()!r} lacks {phrase!r}"


def test_too_many_sequences_and_timesteps_are_refused(
    serve: Any, zoo_repository: Any, tmp_path: Any
) -> None:
    root = zoo.subset(zoo_repository[0], [FLOAT_MODEL], tmp_path / "models")
    server = serve(model_dir=str(root), max_sequences=4, max_request_timesteps=100, warmup=False)
    with Client(server.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.predict(FLOAT_MODEL, [np.ones((2, D))] * 5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "5 sequences in one request; the limit is 4" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.predict(FLOAT_MODEL, [np.ones((60, D))] * 2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "120 timesteps in one request; the limit is 100" in err.value.details()
        assert client.predict(FLOAT_MODEL, [np.ones((50, D))] * 2)[1].length == 50


def test_good_requests_in_flight_with_bad_ones_are_unharmed(
    zoo_server: Any, zoo_repository: Any
) -> None:
    reference = zoo.Reference(zoo_repository[1][FLOAT_MODEL])
    rng = np.random.default_rng(7)
    good = [rng.normal(size=(n, D)).astype(np.float32) for n in rng.integers(1, 60, size=60)]

    async def main() -> tuple[list[Any], list[Any]]:
        async with AsyncClient(zoo_server.target, timeout=60) as client:
            stub = client.stub
            goods = [client.predict(FLOAT_MODEL, [x]) for x in good]
            bads = [stub.Predict(b[1], timeout=60) for b in BAD for _ in range(2)]
            results = await asyncio.gather(*goods, *bads, return_exceptions=True)
        return results[: len(goods)], results[len(goods) :]

    answers, refusals = asyncio.run(main())
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in refusals)
    for x, answer in zip(good, answers, strict=True):
        assert not isinstance(answer, BaseException), answer
        np.testing.assert_allclose(answer[0].output.sequence, reference(x)[0], atol=1e-5, rtol=0)
    with Client(zoo_server.target) as client:
        assert client.health()  # the server is still up and serving
