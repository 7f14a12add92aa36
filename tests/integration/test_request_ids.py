"""Every call carries a request id back in its trailing metadata: the caller's `x-request-id`
(bounded), or one the server made up; failed calls and finished streams too. The same id is in
the server's log line for the call, so a client's error can be found in the server's log."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client.tensors import to_tensor
from rnnserve.server import servicer
from rnnserve.server.logs import Throttle
from rnnserve.server.metrics import UNKNOWN_MODEL
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

import zoo

MODEL = "gru_steps"  # causal: it can stream


def _request(length: int = 5) -> pb.PredictRequest:
    x = np.ones((length, zoo.D), np.float32)
    return pb.PredictRequest(model_name=MODEL, sequences=[to_tensor(x)])


def _id(metadata: Any) -> str | None:
    return dict(metadata or ()).get("x-request-id")


def test_unary_calls_echo_the_callers_id_or_make_one(zoo_server: Any) -> None:
    with grpc.insecure_channel(zoo_server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        _, call = stub.Predict.with_call(_request(), metadata=[("x-request-id", "abc-123")])
        assert _id(call.trailing_metadata()) == "abc-123"

        _, first = stub.Predict.with_call(_request())
        _, second = stub.Predict.with_call(_request())
        made = [_id(first.trailing_metadata()), _id(second.trailing_metadata())]
        assert all(made), made
        assert made[0] != made[1], made

        long_id = "x" * 500
        _, call = stub.Predict.with_call(_request(), metadata=[("x-request-id", long_id)])
        assert _id(call.trailing_metadata()) == long_id[:128]


def test_a_failed_call_carries_its_id_and_the_log_line_names_it(
    zoo_server: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Non-OK lines are throttled per (method, model, code); an earlier test's unknown-model call
    # within the last second would hold this one back, so this test gets a throttle of its own.
    monkeypatch.setattr(servicer, "_THROTTLE", Throttle())
    with grpc.insecure_channel(zoo_server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        bad = pb.PredictRequest(model_name="no_such_model", sequences=_request().sequences)
        with (
            caplog.at_level(logging.INFO, logger="rnnserve.server.servicer"),
            pytest.raises(grpc.RpcError) as failed,
        ):
            stub.Predict(bad, metadata=[("x-request-id", "failing-call-7")])
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert _id(failed.value.trailing_metadata()) == "failing-call-7"
    lines = [r.getMessage() for r in caplog.records if "failing-call-7" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    assert "NOT_FOUND" in lines[0]


def test_a_malformed_request_is_counted_logged_and_carries_its_id(
    zoo_server: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes that do not parse are refused before any handler runs, yet like every failed call
    they are counted, logged with their request id, and the id goes back to the caller."""
    monkeypatch.setattr(servicer, "_THROTTLE", Throttle())
    key = (
        "rnnserve_requests_total",
        (
            ("code", "INVALID_ARGUMENT"),
            ("method", "Predict"),
            ("model", UNKNOWN_MODEL),
            ("version", ""),
        ),
    )
    before = zoo_server.scrape().get(key, 0.0)
    with grpc.insecure_channel(zoo_server.target) as channel:
        raw = channel.unary_unary("/rnnserve.v1.Inference/Predict")
        with (
            caplog.at_level(logging.INFO, logger="rnnserve.server.servicer"),
            pytest.raises(grpc.RpcError) as failed,
        ):
            raw(b"\xff\xff\xff\xff", timeout=10, metadata=[("x-request-id", "garbled-3")])
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _id(failed.value.trailing_metadata()) == "garbled-3"
    lines = [r.getMessage() for r in caplog.records if "garbled-3" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    assert "INVALID_ARGUMENT" in lines[0]
    assert "do not parse" in lines[0]
    assert zoo_server.scrape()[key] == before + 1


def test_a_stream_that_ends_well_carries_its_id(zoo_server: Any) -> None:
    x = np.ones((4, zoo.D), np.float32)
    messages = [
        pb.StreamRequest(open=pb.StreamOpen(model_name=MODEL)),
        pb.StreamRequest(chunk=pb.Chunk(data=to_tensor(x))),
        pb.StreamRequest(close=True),
    ]
    with grpc.insecure_channel(zoo_server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.Stream(iter(messages), metadata=[("x-request-id", "stream-9")])
        kinds = [response.WhichOneof("kind") for response in call]
        assert kinds == ["opened", "step", "closed"]
        assert call.code() == grpc.StatusCode.OK
        assert _id(call.trailing_metadata()) == "stream-9"
