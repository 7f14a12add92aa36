"""TLS, mutual TLS and bearer tokens with the real client, the refusals included; models that
carry code are refused unless the operator opts in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import TLS, Client, RetryPolicy

import zoo
from pki import make_pki

NO_RETRY = RetryPolicy(max_attempts=1)
X = np.ones((3, zoo.D), np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def one_model(zoo_repository: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(zoo.subset(zoo_repository[0], ["lstm_masked"], tmp_path_factory.mktemp("m")))


def test_tls(serve: Any, one_model: str, pki: dict[str, tuple[str, str]]) -> None:
    cert, key = pki["server"]
    server = serve(model_dir=one_model, tls_cert=cert, tls_key=key, warmup=False)
    with Client(server.target, tls=TLS(ca=pki["ca"][0]), retry=NO_RETRY) as client:
        assert client.predict("lstm_masked", [X])[0].length == 3
    with Client(server.target, retry=NO_RETRY) as plain, pytest.raises(grpc.RpcError) as err:
        plain.predict("lstm_masked", [X], timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    untrusted = TLS(ca=pki["stranger"][0])
    with (
        Client(server.target, tls=untrusted, retry=NO_RETRY) as client,
        pytest.raises(grpc.RpcError) as err,
    ):
        client.predict("lstm_masked", [X], timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # The command line: --tls trusts the system's CAs (gRPC reads them from this variable when
    # set), so the test CA works there and nowhere else.
    health = [str(Path(sys.executable).parent / "rnnserve"), "health", "--tls"]
    health += ["--target", server.target, "--timeout", "5"]
    system_roots = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": pki["ca"][0]}
    ok = subprocess.run(health, env=system_roots, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    strangers = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": pki["stranger"][0]}
    refused = subprocess.run(health, env=strangers, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr
    # A container's health check: no flags, the CA from the environment.
    from_env = {**os.environ, "RNNSERVE_CA": pki["ca"][0], "RNNSERVE_TARGET": server.target}
    check = [health[0], "health", "--timeout", "5"]
    ok = subprocess.run(check, env=from_env, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr


def test_mutual_tls(serve: Any, one_model: str, pki: dict[str, tuple[str, str]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    server = serve(model_dir=one_model, tls_cert=cert, tls_key=key, tls_client_ca=ca, warmup=False)
    good = TLS(ca=ca, cert=pki["client"][0], key=pki["client"][1])
    with Client(server.target, tls=good, retry=NO_RETRY) as client:
        assert client.predict("lstm_masked", [X])[0].length == 3
    for refused in (TLS(ca=ca), TLS(ca=ca, cert=pki["stranger"][0], key=pki["stranger"][1])):
        with Client(server.target, tls=refused, retry=NO_RETRY) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.predict("lstm_masked", [X], timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens(serve: Any, one_model: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token per line\nalpha-secret\n\nbeta-secret\n")
    server = serve(model_dir=one_model, token_file=str(tokens), warmup=False)
    for token in ("alpha-secret", "beta-secret"):
        with Client(server.target, token=token, retry=NO_RETRY) as client:
            assert client.predict("lstm_masked", [X])[0].length == 3
            with client.session("lstm_masked") as session:  # streams are guarded too
                assert session.send(X).total_steps == 3
    for token in (None, "wrong", "alpha-secre", "alpha-secret2"):
        with Client(server.target, token=token, retry=NO_RETRY) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.predict("lstm_masked", [X])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                client.list_models()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err, client.session("lstm_masked"):
                pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert client.health()  # probes need no secret
    # Refusals are counted like any failed call (they used to be in neither metrics nor logs).
    refused = {
        method: samples
        for (name, labels), samples in server.scrape().items()
        if name == "rnnserve_requests_total" and ("code", "UNAUTHENTICATED") in labels
        for key, method in labels
        if key == "method"
    }
    assert refused == {"Predict": 4, "ListModels": 4, "Stream": 4}


def test_models_carrying_code_are_refused_unless_allowed(serve: Any, tmp_path: Path) -> None:
    import keras

    inp = keras.Input((None, zoo.D))
    hidden = keras.layers.Lambda(lambda t: t * 2.0)(
        keras.layers.LSTM(4, return_sequences=True)(inp)
    )
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GRU(3)(hidden)))
    (tmp_path / "models" / "coded" / "1").mkdir(parents=True)
    model.save(tmp_path / "models" / "coded" / "1" / "model.keras")
    safe = serve(model_dir=str(tmp_path / "models"), warmup=False)
    with Client(safe.target) as client:
        (summary,) = client.list_models().models
        assert "carries code" in summary.versions[0].error
        assert "--allow-code" in summary.versions[0].error
    trusting = serve(model_dir=str(tmp_path / "models"), allow_code=True, warmup=False)
    with Client(trusting.target) as client:
        info = client.metadata("coded")
        assert not info.mixed_length_batching  # a Lambda is not proven exact under padding
        got = client.predict("coded", [X])[0].output.sequence
        np.testing.assert_allclose(got, np.asarray(model(X[None]))[0], atol=1e-5, rtol=0)
