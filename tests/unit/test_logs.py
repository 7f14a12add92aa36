"""Non-OK log lines are throttled per kind, and the next line says how many were held back."""

from __future__ import annotations

from rnnserve.server.logs import Throttle


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
