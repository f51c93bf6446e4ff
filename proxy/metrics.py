"""Prometheus metrics, computed at scrape time from plain counters.

The request path only increments integers in a dict (no prometheus_client call, no lock);
``GET /metrics`` turns them, and whatever the plugins registered, into the exposition format.
A plugin registers a source in its ``lifespan`` with ``app[METRICS].add(name, fn)``: ``fn()``
returns ``{metric_name: (kind, help, value or {labels_tuple: value}, label_names)}``. Registering
the same name again (a policy reload) replaces the old source. A ``histogram`` sample's value
is ``Histogram.value()``: buckets counted by whoever observes, turned into a family at scrape
time like the rest.

``tollway meter`` serves the same registry without the request counters (``core=False``):
its figures are all sources, and one exposition path serves both processes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Sample = tuple[str, str, Any, tuple[str, ...]]
Source = Callable[[], dict[str, Sample]]


class Metrics:
    """Core request counters plus plugin sources, exposed as one registry.

    prometheus_client is imported at the first scrape, not at startup: a gateway nobody scrapes
    does not carry it in memory.
    """

    def __init__(self, core: bool = True) -> None:
        self.core = core  # the request counters below are exposed (a gateway's registry)
        self.requests: defaultdict[tuple[str, int, str], int] = defaultdict(int)
        self.latency_sum: defaultdict[str, float] = defaultdict(float)
        self.in_flight = 0
        self._sources: dict[str, Source] = {}
        self._registry: Any = None

    def add(self, name: str, fn: Source) -> None:
        self._sources[name] = fn

    def observe(self, endpoint: str, status: int, cache: str | None, seconds: float) -> None:
        self.requests[(endpoint, status, cache or "")] += 1
        self.latency_sum[endpoint] += seconds

    def snapshot(self) -> dict[str, Any]:
        """Every plugin source's current values: ``{metric_name: value or {labels: value}}``."""
        out: dict[str, Any] = {}
        for source in list(self._sources.values()):
            for name, (_kind, _help, value, _labels) in source().items():
                out[name] = value
        return out

    def collect(self) -> Iterator[Any]:
        if self.core:
            yield from self._core()
        for source in list(self._sources.values()):
            for name, (kind, help_, value, labels) in source().items():
                yield _family(name, kind, help_, value, labels)

    def _core(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        req = CounterMetricFamily(
            "tollway_requests",
            "Requests answered, by endpoint, status and cache result.",
            labels=["endpoint", "status", "cache"],
        )
        counts: defaultdict[str, int] = defaultdict(int)
        for (endpoint, status, cache), n in sorted(self.requests.items()):
            req.add_metric([endpoint, str(status), cache], n)
            counts[endpoint] += n
        yield req
        dur = CounterMetricFamily(
            "tollway_request_duration_seconds_sum",
            "Total time spent answering, by endpoint.",
            labels=["endpoint"],
        )
        for endpoint, total in sorted(self.latency_sum.items()):
            dur.add_metric([endpoint], total)
        yield dur
        yield GaugeMetricFamily(
            "tollway_requests_in_flight", "Requests being served now.", value=self.in_flight
        )

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self)
        return generate_latest(self._registry)  # type: ignore[no-any-return]


class Histogram:
    """Observations counted into fixed buckets with plain integers (no prometheus_client call,
    no lock: one thread observes), exposed as a ``histogram`` sample at scrape time."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def value(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` buckets ending with ``+Inf``, and the sum."""
        buckets, total = [], 0
        for le, n in zip([*map(repr, self.bounds), "+Inf"], list(self.counts), strict=True):
            total += n
            buckets.append((le, total))
        return buckets, self.sum


def _family(name: str, kind: str, help_: str, value: Any, labels: tuple[str, ...]) -> Any:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    if kind == "histogram":
        buckets, total = value
        return HistogramMetricFamily(name, help_, buckets=buckets, sum_value=total)
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    if not labels:
        return cls(name, help_, value=value)
    fam = cls(name, help_, labels=list(labels))
    for label_values, v in value.items():
        fam.add_metric(list(label_values), v)
    return fam
