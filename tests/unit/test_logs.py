"""Non-OK log lines are throttled per kind, and the next line says how many were held back;
the log level applies to rnnserve's own loggers."""

from __future__ import annotations

import logging

from rnnserve.server.logs import Throttle, configure


def test_one_line_per_kind_per_interval_with_a_count_of_the_rest() -> None:
    throttle = Throttle(interval=1.0)
    refused = ("Predict", "m", "RESOURCE_EXHAUSTED")
    invalid = ("Predict", "m", "INVALID_ARGUMENT")
    assert throttle.allow(refused, 10.0) == (True, 0)
    assert [throttle.allow(refused, 10.0 + i / 10) for i in range(1, 6)] == [(False, 0)] * 5
    assert throttle.allow(invalid, 10.5) == (True, 0)  # another kind has its own budget
    assert throttle.allow(refused, 11.0) == (True, 5)  # the five held back are reported once
    assert throttle.allow(refused, 12.5) == (True, 0)


def test_the_number_of_kinds_it_remembers_is_bounded() -> None:
    throttle = Throttle(interval=60.0, max_keys=3)
    for i in range(10):
        assert throttle.allow(("Predict", f"model{i}", "NOT_FOUND"), 1.0)[0]
    assert len(throttle._last) <= 3


def test_debug_level_is_rnnserve_s_own() -> None:
    """--log-level debug used to set the root logger: gRPC then logged every call, asyncio and
    h5py their internals."""
    root, ours = logging.getLogger(), logging.getLogger("rnnserve")
    saved = (root.handlers[:], root.level, ours.level)
    try:
        configure("text", "debug")
        assert logging.getLogger("rnnserve.server.batching").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("asyncio").isEnabledFor(logging.INFO)
        configure("text", "warning")
        assert not logging.getLogger("rnnserve.server.servicer").isEnabledFor(logging.INFO)
        assert not logging.getLogger("grpc").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        ours.setLevel(saved[2])
