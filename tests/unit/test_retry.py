"""The client's retry decision: which refusals are worth another try."""

from __future__ import annotations

import grpc

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
