"""The request path's tallies export exactly what prometheus_client's own metrics would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric

from rnnserve.server.tallies import CounterTally, HistogramTally, Tallies

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
LABELS = st.sampled_from([("a", "1"), ("a", "2"), ("b", "1")])


def exposition(*metrics: object) -> list[str]:
    registry = CollectorRegistry()
    for metric in metrics:
        registry.register(metric)  # type: ignore[arg-type]
    return sorted(generate_latest(registry).decode().splitlines())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(LABELS, st.sampled_from([0.0, 0.001, 0.01, 1.0, 10.0, 11.0, 0.5, 0.0049])),
        max_size=40,
    )
)
def test_histogram_matches_prometheus_client(
    observations: list[tuple[tuple[str, str], float]],
) -> None:
    ours = HistogramTally("t_seconds", "doc", ("model", "version"), BUCKETS)
    theirs = Histogram("t_seconds", "doc", ["model", "version"], buckets=BUCKETS, registry=None)
    for labels, value in observations:
        ours.observe(labels, value)
        theirs.labels(*labels).observe(value)
    assert exposition(Tallies([ours])) == _without_created(exposition(theirs))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(LABELS, st.integers(0, 1000)), max_size=30))
def test_counter_matches_prometheus_client(increments: list[tuple[tuple[str, str], int]]) -> None:
    ours = CounterTally("t_steps", "doc", ("model", "version"))
    theirs = Counter("t_steps", "doc", ["model", "version"], registry=None)
    for labels, amount in increments:
        ours.inc(labels, amount)
        theirs.labels(*labels).inc(amount)
    assert exposition(Tallies([ours])) == _without_created(exposition(theirs))


def test_observe_many_equals_one_by_one() -> None:
    values = [0.0005, 0.002, 0.002, 3.0, 100.0]
    one, many = (HistogramTally("h", "doc", ("m",), BUCKETS) for _ in range(2))
    for value in values:
        one.observe(("x",), value)
    many.observe_many(("x",), values)
    assert exposition(Tallies([one])) == exposition(Tallies([many]))
    family: Metric = many.family()
    count = next(s.value for s in family.samples if s.name == "h_count")
    assert count == len(values)


def _without_created(lines: list[str]) -> list[str]:
    return [line for line in lines if "_created" not in line]
