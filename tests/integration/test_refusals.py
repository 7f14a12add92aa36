"""Every bad input we know of, sent to a real server; the statuses they get make the README's
refusal table. The test fails when the README's table is not what the server does now; run it
with RNNSERVE_UPDATE_DOCS=1 to rewrite the table."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import TLS, Client, RetryPolicy
from rnnserve.client.tensors import to_tensor
from rnnserve.v1 import inference_pb2 as pb

import zoo
from pki import make_pki

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- refusals:start -->", "<!-- refusals:end -->"
NO_RETRY = RetryPolicy(max_attempts=1)
TOKEN = "refusal-table-token"
D = zoo.D


def _predict(stub: Any, *tensors: pb.Tensor, model: str = "lstm_masked", **kw: Any) -> Any:
    return stub.Predict(
        pb.PredictRequest(model_name=model, sequences=list(tensors), **kw),
        timeout=30,
        metadata=(("authorization", f"Bearer {TOKEN}"),),
    )


def _f32(shape: tuple[int, ...], fill: float = 1.0) -> pb.Tensor:
    return to_tensor(np.full(shape, fill, np.float32))


def _cases(
    client: Client, target: str, pki: dict[str, tuple[str, str]], mtls: str
) -> list[tuple[str, Callable[[], Any]]]:
    stub = client.stub
    session = client.open_session("lstm_masked")
    client.step(session.session_id, np.ones((4, D)), offset=0)
    raw = client.channel.unary_unary("/rnnserve.v1.Inference/Predict")
    auth = (("authorization", f"Bearer {TOKEN}"),)
    wrong_size = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[3, D], data=b"\0" * 7)
    return [
        ("malformed protobuf", lambda: raw(b"\xff\xff\xff\xff", timeout=10, metadata=auth)),
        (
            "wrong dtype (int32 features)",
            lambda: _predict(stub, to_tensor(np.ones((4, D), np.int32))),
        ),
        ("wrong rank ([2, 4, 6])", lambda: _predict(stub, _f32((2, 4, D)))),
        ("wrong feature dim ([4, 5])", lambda: _predict(stub, _f32((4, D - 1)))),
        ("NaN", lambda: _predict(stub, _f32((4, D), np.nan))),
        ("Inf", lambda: _predict(stub, _f32((4, D), np.inf))),
        ("empty sequence ([0, 6])", lambda: _predict(stub, _f32((0, D)))),
        ("no sequences", lambda: _predict(stub)),
        ("payload size not matching the shape", lambda: _predict(stub, wrong_size)),
        (
            "token id outside the vocabulary",
            lambda: _predict(
                stub, to_tensor(np.array([1, 99], np.int32)), model="embedding_masked"
            ),
        ),
        ("over the model's max length", lambda: _predict(stub, _f32((61, D)))),
        ("over sequences per request (9 > 8)", lambda: _predict(stub, *[_f32((2, D))] * 9)),
        ("over timesteps per request (2 x 50 > 80)", lambda: _predict(stub, *[_f32((50, D))] * 2)),
        ("over the message size (2 MiB > 1 MiB)", lambda: _predict(stub, _f32((9000, 60)))),
        ("unknown model", lambda: _predict(stub, _f32((2, D)), model="nope")),
        ("unknown version", lambda: _predict(stub, _f32((2, D)), model_version=9)),
        ("unknown output name", lambda: _predict(stub, _f32((2, D)), output_names=["nope"])),
        (
            "per-step output of a non-causal many-to-one model",
            lambda: _predict(stub, _f32((2, D)), model="bidirectional", output_mode=2),
        ),
        ("unknown session", lambda: client.step("0123456789abcdef", np.ones((2, D)))),
        ("out-of-order chunk", lambda: client.step(session.session_id, np.ones((2, D)), offset=9)),
        ("bad session id", lambda: client.step("../etc", np.ones((2, D)))),
        (
            "bad session id to resume a stream",
            lambda: client.session("lstm_masked", session_id="../etc"),
        ),
        (
            "resuming a stream at another model version",
            lambda: client.session("lstm_masked", version=2, session_id=session.session_id),
        ),
        ("streaming a non-causal model", lambda: client.open_session("bidirectional")),
        (
            "over sessions per server (refuse mode)",
            lambda: [client.open_session("lstm_masked") for _ in range(3)],
        ),
        ("bad token", lambda: Client(target, token="wrong", retry=NO_RETRY).list_models()),
        ("no token", lambda: Client(target, retry=NO_RETRY).list_models()),
        (
            "no client certificate (mutual TLS)",
            lambda: Client(mtls, tls=TLS(ca=pki["ca"][0]), retry=NO_RETRY).list_models(timeout=5),
        ),
    ]


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| bad input | status | message (start) |", "|---|---|---|"]
    for case, code, message in rows:
        text = re.sub(r"\s+", " ", message).replace("|", "\\|")
        text = re.sub(r"[0-9a-f]{32}", "<id>", text)  # generated ids and ports vary per run
        text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", text)
        lines.append(f"| {case} | `{code}` | {text[:110]} |")
    return "\n".join(lines)


def test_every_refusal_is_documented(serve: Any, zoo_repository: Any, tmp_path: Path) -> None:
    root = zoo.subset(
        zoo_repository[0], ["lstm_masked", "embedding_masked", "bidirectional"], tmp_path / "m"
    )
    (root / "lstm_masked").unlink()  # a copy with its own max_length
    (root / "lstm_masked" / "1").mkdir(parents=True)
    for f in (zoo_repository[0] / "lstm_masked" / "1").iterdir():
        (root / "lstm_masked" / "1" / f.name).symlink_to(f)
    (root / "lstm_masked" / "1" / "config.json").unlink()
    (root / "lstm_masked" / "1" / "config.json").write_text('{"max_length": 60}')
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    pki = make_pki(tmp_path / "pki")
    server = serve(
        model_dir=str(root),
        token_file=str(tokens),
        max_sequences=8,
        max_request_timesteps=80,
        max_message_mb=1,
        max_sessions=2,
        session_overflow="refuse",
        warmup=False,
    )
    mtls = serve(
        model_dir=str(zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path / "n")),
        tls_cert=pki["server"][0],
        tls_key=pki["server"][1],
        tls_client_ca=pki["ca"][0],
        warmup=False,
    )
    rows = []
    with Client(server.target, token=TOKEN, retry=NO_RETRY) as client:
        for case, call in _cases(client, server.target, pki, mtls.target):
            with pytest.raises(grpc.RpcError) as err:
                call()
            rows.append((case, err.value.code().name, err.value.details() or ""))
        assert client.health()  # and the server is still up
    assert all(code != "OK" for _, code, _ in rows)
    assert {code for _, code, _ in rows} >= {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "UNAVAILABLE",
    }
    table = _table(rows)
    text = README.read_text()
    before, rest = text.split(START, 1)
    current, after = rest.split(END, 1)
    if os.environ.get("RNNSERVE_UPDATE_DOCS"):
        README.write_text(f"{before}{START}\n{table}\n{END}{after}")
    else:
        assert current.strip() == table, (
            "README's refusal table is stale; rerun with RNNSERVE_UPDATE_DOCS=1:\n" + table
        )
