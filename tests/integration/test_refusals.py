"""Every bad input we know of, sent to a real server; the statuses they get make the README's
refusal table. The test fails when the README's table is not what the server does now; run it
with RNNSERVE_UPDATE_DOCS=1 to rewrite the table."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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


class Case(NamedTuple):
    """One bad input: what the server must answer (status, and a phrase of the message that
    names what was expected), and the call that sends it."""

    name: str
    code: grpc.StatusCode
    phrase: str
    call: Callable[[], Any]


INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
FEATURES = f"expected float32 features of shape [T, {D}] with 1 <= T <= 60"
BAD_ID = "is invalid; expected 1-128 characters of letters, digits and . _ : -"
BEARER = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def _cases(client: Client, target: str, pki: dict[str, tuple[str, str]], mtls: str) -> list[Case]:
    stub = client.stub
    session = client.open_session("lstm_masked")
    client.step(session.session_id, np.ones((4, D)), offset=0)
    raw = client.channel.unary_unary("/rnnserve.v1.Inference/Predict")
    auth = (("authorization", f"Bearer {TOKEN}"),)
    wrong_size = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[3, D], data=b"\0" * 7)
    return [
        Case(
            "malformed protobuf",
            INVALID,
            "do not parse as the request of rnnserve.v1.Inference/Predict",
            lambda: raw(b"\xff\xff\xff\xff", timeout=10, metadata=auth),
        ),
        Case(
            "wrong dtype (int32 features)",
            INVALID,
            f"{FEATURES}, got dtype int32",
            lambda: _predict(stub, to_tensor(np.ones((4, D), np.int32))),
        ),
        Case(
            "wrong rank ([2, 4, 6])",
            INVALID,
            f"{FEATURES}, got shape [2, 4, {D}]",
            lambda: _predict(stub, _f32((2, 4, D))),
        ),
        Case(
            "wrong feature dim ([4, 5])",
            INVALID,
            f"{FEATURES}, got shape [4, {D - 1}]",
            lambda: _predict(stub, _f32((4, D - 1))),
        ),
        Case(
            "NaN",
            INVALID,
            "NaN or Inf at timestep 0; features must be finite",
            lambda: _predict(stub, _f32((4, D), np.nan)),
        ),
        Case(
            "Inf",
            INVALID,
            "NaN or Inf at timestep 0; features must be finite",
            lambda: _predict(stub, _f32((4, D), np.inf)),
        ),
        Case(
            "empty sequence ([0, 6])",
            INVALID,
            f"empty sequence; {FEATURES}",
            lambda: _predict(stub, _f32((0, D))),
        ),
        Case(
            "no sequences",
            INVALID,
            "no sequences in the request; expected one or more float32 features",
            lambda: _predict(stub),
        ),
        Case(
            "payload size not matching the shape",
            INVALID,
            f"shape [3, {D}] of float32 needs {3 * D * 4} bytes, payload has 7",
            lambda: _predict(stub, wrong_size),
        ),
        Case(
            "a shape of thousands of huge dimensions",
            INVALID,
            "(3001 dimensions)",
            lambda: _predict(
                stub, pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[10] + [2**62] * 3000)
            ),
        ),
        Case(
            "more output names than the model has outputs",
            INVALID,
            "2 output names for model lstm_masked, which has 1 outputs; name each at most once",
            lambda: _predict(stub, _f32((3, D)), output_names=["label", "label"]),
        ),
        Case(
            "token id outside the vocabulary",
            INVALID,
            f"token ids must be in [0, {zoo.VOCAB}), got values from 1 to 99",
            lambda: _predict(
                stub, to_tensor(np.array([1, 99], np.int32)), model="embedding_masked"
            ),
        ),
        Case(
            "over the model's max length",
            INVALID,
            "61 timesteps, longer than model lstm_masked's maximum 60",
            lambda: _predict(stub, _f32((61, D))),
        ),
        Case(
            "over sequences per request (9 > 8)",
            EXHAUSTED,
            "9 sequences in one request; the limit is 8",
            lambda: _predict(stub, *[_f32((2, D))] * 9),
        ),
        Case(
            "over timesteps per request (2 x 50 > 80)",
            EXHAUSTED,
            "100 timesteps in one request; the limit is 80",
            lambda: _predict(stub, *[_f32((50, D))] * 2),
        ),
        Case(
            "over the message size (2 MiB > 1 MiB)",
            EXHAUSTED,
            "larger than max",
            lambda: _predict(stub, _f32((9000, 60))),
        ),
        Case(
            "unknown model",
            NOT_FOUND,
            "model 'nope' is not served; models served: bidirectional, embedding_masked, "
            "lstm_masked",
            lambda: _predict(stub, _f32((2, D)), model="nope"),
        ),
        Case(
            "unknown version",
            NOT_FOUND,
            "has no version 9 ready; ready versions: 1",
            lambda: _predict(stub, _f32((2, D)), model_version=9),
        ),
        Case(
            "unknown output name",
            INVALID,
            "has no output 'nope'; its outputs are label",
            lambda: _predict(stub, _f32((2, D)), output_names=["nope"]),
        ),
        Case(
            "per-step output of a non-causal many-to-one model",
            INVALID,
            "is one per sequence and the model is not causal",
            lambda: _predict(stub, _f32((2, D)), model="bidirectional", output_mode=2),
        ),
        Case(
            "unknown session",
            NOT_FOUND,
            "session 0123456789abcdef not found",
            lambda: client.step("0123456789abcdef", np.ones((2, D))),
        ),
        Case(
            "out-of-order chunk",
            PRECONDITION,
            "it starts at offset 9 but the session has consumed 4 timesteps",
            lambda: client.step(session.session_id, np.ones((2, D)), offset=9),
        ),
        Case(
            "bad session id",
            INVALID,
            BAD_ID,
            lambda: client.step("../etc", np.ones((2, D))),
        ),
        Case(
            "bad session id to resume a stream",
            INVALID,
            BAD_ID,
            lambda: client.session("lstm_masked", session_id="../etc"),
        ),
        Case(
            "resuming a stream at another model version",
            INVALID,
            "is pinned to version 1 of lstm_masked, not 2",
            lambda: client.session("lstm_masked", version=2, session_id=session.session_id),
        ),
        Case(
            "streaming a non-causal model",
            PRECONDITION,
            "model bidirectional version 1 cannot stream: not causal",
            lambda: client.open_session("bidirectional"),
        ),
        Case(
            "over sessions per server (refuse mode)",
            EXHAUSTED,
            "too many sessions (2 open)",
            lambda: [client.open_session("lstm_masked") for _ in range(3)],
        ),
        Case(
            "bad token",
            UNAUTHENTICATED,
            BEARER,
            lambda: Client(target, token="wrong", retry=NO_RETRY).list_models(),
        ),
        Case(
            "no token",
            UNAUTHENTICATED,
            BEARER,
            lambda: Client(target, retry=NO_RETRY).list_models(),
        ),
        Case(
            # The TLS handshake fails, so the client's transport says it: no server message.
            "no client certificate (mutual TLS)",
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses",
            lambda: Client(mtls, tls=TLS(ca=pki["ca"][0]), retry=NO_RETRY).list_models(timeout=30),
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
    wrong = []
    with Client(server.target, token=TOKEN, retry=NO_RETRY) as client:
        for case in _cases(client, server.target, pki, mtls.target):
            with pytest.raises(grpc.RpcError) as err:
                case.call()
            code, message = err.value.code(), err.value.details() or ""
            rows.append((case.name, code.name, message))
            if code != case.code or case.phrase not in message:
                wrong.append(
                    f"{case.name}: expected {case.code.name} with {case.phrase!r}, "
                    f"got {code.name}: {message!r}"
                )
        assert client.health()  # and the server is still up
    assert not wrong, "\n".join(wrong)
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
