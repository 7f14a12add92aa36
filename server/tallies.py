"""Counters and histograms for the request path, exported in Prometheus' format at scrape time.

prometheus_client's metrics take a lock and walk every bucket on each observation, which is a
measurable share of a request's time on the event loop. These tallies are updated by one thread
(the event loop) with a dict lookup and an addition, and read by the metrics HTTP thread when
Prometheus scrapes. A scrape copies each series' buckets once and derives the count from them, so
a histogram it reports is always self-consistent.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class CounterTally:
    def __init__(self, name: str, documentation: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = list(label_names)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for labels, value in list(self.values.items()):
            family.add_metric(list(labels), value)
        return family


class HistogramTally:
    def __init__(
        self,
        name: str,
        documentation: str,
        label_names: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = list(label_names)
        self.bounds = sorted(float(b) for b in buckets)
        # Per series: counts per bucket (not cumulative; the last one is +Inf), and the sum.
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def _series(self, labels: Labels) -> list[int]:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.bounds) + 1)
            self.sums[labels] = 0.0
        return counts

    def observe(self, labels: Labels, value: float) -> None:
        # Prometheus buckets are `le` (inclusive): the first bound >= value.
        self._series(labels)[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[labels] += value

    def observe_many(self, labels: Labels, values: Iterable[float]) -> None:
        counts, bounds, total = self._series(labels), self.bounds, 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
            total += value
        self.sums[labels] += total

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        for labels, counts in list(self.counts.items()):
            snapshot = list(counts)
            cumulative, buckets = 0, []
            for bound, count in zip([*self.bounds, float("inf")], snapshot, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(labels), buckets, self.sums.get(labels, 0.0))
        return family


class Tallies(Collector):
    """Registers tallies with a prometheus_client registry."""

    def __init__(self, tallies: Sequence[CounterTally | HistogramTally]) -> None:
        self._tallies = list(tallies)

    def collect(self) -> Iterable[Metric]:
        for tally in self._tallies:
            yield tally.family()
