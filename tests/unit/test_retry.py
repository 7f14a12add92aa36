"""The client's retry decision: which refusals are worth another try."""

from __future__ import annotations

import grpc
import pytest

from rnnserve.client import RetryPolicy
from rnnserve.client.connection import retry_delay


class Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, *metadata: tuple[str, str]) -> None:
        self._code, self._metadata = code, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def test_resource_exhausted_is_retried_only_when_the_server_says_when() -> None:
    policy = RetryPolicy()
    hinted = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, ("retry-after-ms", "300"))
    assert policy.allows(hinted)
    assert retry_delay(hinted, 0.05) == 0.3  # at least the hint
    assert retry_delay(hinted, 0.5) == 0.5
    assert not policy.allows(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED))  # over a limit
    assert policy.allows(Refusal(grpc.StatusCode.UNAVAILABLE))
    assert policy.allows(Refusal(grpc.StatusCode.CANCELLED))  # shed by an overloaded server
    assert not policy.allows(Refusal(grpc.StatusCode.INVALID_ARGUMENT))


class _Stub:
    """Stands in for the generated stub: OpenSession fails with the given refusals, then opens."""

    def __init__(self, *refusals: Refusal) -> None:
        self.refusals = list(refusals)
        self.calls = 0

    def OpenSession(self, request: object, **kwargs: object) -> object:
        from rnnserve.v1 import inference_pb2 as pb

        self.calls += 1
        if self.refusals:
            raise self.refusals.pop(0)
        return pb.SessionInfo(session_id="s1", model_name="m", model_version=1)


def test_opening_a_session_is_not_retried_when_it_may_have_happened() -> None:
    """After UNAVAILABLE the server may have created the session; a retry would orphan it. A
    refusal that proves nothing was created (hinted RESOURCE_EXHAUSTED) is retried."""
    from rnnserve.client import Client

    with Client("127.0.0.1:1") as client:
        client.stub = _Stub(Refusal(grpc.StatusCode.UNAVAILABLE))  # type: ignore[assignment]
        with pytest.raises(grpc.RpcError) as refused:
            client.open_session("m")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.stub.calls == 1  # type: ignore[attr-defined]

        hinted = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, ("retry-after-ms", "1"))
        client.stub = _Stub(hinted)  # type: ignore[assignment]
        assert client.open_session("m").session_id == "s1"
        assert client.stub.calls == 2  # type: ignore[attr-defined]
