"""Counters, gauges and histograms, and their Prometheus text exposition.

Theory of operation. The daemon is one asyncio thread, so a metric is a dict from a tuple of
label values to a number, changed without locks; the hot path (a cached answer) pays a dict
update. Gauges that mirror live state (tunnels up, pinned endpoints by state) are not kept
up to date by the parts that own the state: a *collector* reads them when someone asks
(a scrape, `autosp stats`), so nothing changes in those parts.

`Registry.render()` writes the Prometheus text format, version 0.0.4 (HELP, TYPE, samples;
histograms as cumulative `_bucket{le=...}`, `_sum`, `_count`), the format `promtool check
metrics` checks (the lab test runs it on a live scrape). `Registry.snapshot()` gives the same
numbers as JSON for the control socket's `stats` command.

Why not the `prometheus_client` package: every `inc()` there takes a `threading.Lock` (it is
built for threaded servers), its HTTP exposition runs in a thread of its own beside our event
loop, and the control socket needs the numbers as data, not text. What it would save us is
this file's writer, about sixty lines, whose output the real `promtool` checks in the tests.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

# Seconds: DNS round trips (sub-millisecond in a LAN, hundreds of ms across the world) and
# tunnel setups (6-8 ms in the lab, seconds when a peer retransmits) share one scale.
log = logging.getLogger(__name__)

TIME_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                       5.0, 10.0)

Labels = tuple[str, ...]


class Metric:
    """One metric family: a name, a help text, label names and one value per label tuple."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self.values: dict[Labels, float] = {}

    def samples(self) -> Iterable[tuple[str, Labels, Labels, float]]:
        """(sample name, label names, label values, value) for every sample."""
        for key, value in sorted(self.values.items()):
            yield self.name, self.labels, key, value

    def snapshot(self) -> dict[str, Any]:
        """The family as JSON-able data: {name, type, help, samples: [{labels, value}]}."""
        return {"name": self.name, "type": self.kind, "help": self.help,
                "samples": [{"name": n, "labels": dict(zip(names, vals, strict=True)),
                             "value": v} for n, names, vals, v in self.samples()]}


class Counter(Metric):
    """A number that only goes up (restarts reset it; Prometheus' rate() copes)."""

    kind = "counter"

    def inc(self, *labels: str, by: float = 1.0) -> None:
        """Add `by` to the sample with these label values (created at 0 first)."""
        self.values[labels] = self.values.get(labels, 0.0) + by

    def declare(self, *labels: str) -> None:
        """Make the sample exist at 0, so dashboards see the series before the first event."""
        self.values.setdefault(labels, 0.0)


class Gauge(Metric):
    """A number that goes up and down; usually set by a collector at scrape time."""

    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def add(self, by: float, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def replace(self, values: dict[Labels, float]) -> None:
        """All samples at once (a collector's view; series that went away disappear)."""
        self.values = dict(values)


class Histogram(Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = TIME_BUCKETS) -> None:
        super().__init__(name, help, labels)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError(f"{name}: buckets must be increasing and distinct")
        self.bounds = tuple(float(b) for b in buckets)
        # per label tuple: [count in each bucket (not cumulative) ..., +Inf bucket, sum]
        self.series: dict[Labels, list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        row = self.series.get(labels)
        if row is None:
            row = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def samples(self) -> Iterable[tuple[str, Labels, Labels, float]]:
        names = (*self.labels, "le")
        for key, row in sorted(self.series.items()):
            running = 0.0
            for bound, n in zip((*self.bounds, math.inf), row[:-1], strict=True):
                running += n
                yield f"{self.name}_bucket", names, (*key, _number(bound)), running
            yield f"{self.name}_sum", self.labels, key, row[-1]
            yield f"{self.name}_count", self.labels, key, running


class Registry:
    """The daemon's metrics, plus the collectors that refresh gauges before each read."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.metrics: dict[str, Metric] = {}
        self.collectors: list[Callable[[], None]] = []

    def _add(self, metric: Metric) -> Any:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        c: Counter = self._add(Counter(self.prefix + name, help, labels))
        return c

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        g: Gauge = self._add(Gauge(self.prefix + name, help, labels))
        return g

    def histogram(self, name: str, help: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = TIME_BUCKETS) -> Histogram:
        h: Histogram = self._add(Histogram(self.prefix + name, help, labels, buckets))
        return h

    def collect(self) -> None:
        """Run the collectors (a failing one is a bug; it must not hide the other numbers)."""
        for fn in self.collectors:
            try:
                fn()
            except Exception:
                log.exception("metrics collector failed")

    def render(self) -> str:
        """Every metric in the Prometheus text format 0.0.4 (collectors run first)."""
        self.collect()
        out: list[str] = []
        for m in self.metrics.values():
            out.append(f"# HELP {m.name} {_escape_help(m.help)}")
            out.append(f"# TYPE {m.name} {m.kind}")
            for name, label_names, label_values, value in m.samples():
                out.append(f"{name}{_labels(label_names, label_values)} {_number(value)}")
        return "\n".join(out) + "\n"

    def snapshot(self) -> list[dict[str, Any]]:
        """Every metric as data (the control socket's `stats` reply)."""
        self.collect()
        return [m.snapshot() for m in self.metrics.values()]


CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def flat_lines(snapshot: list[dict[str, Any]]) -> list[str]:
    """A `stats` snapshot as `name{label="v"} value` lines (what `autosp stats` prints)."""
    lines = []
    for family in snapshot:
        for s in family.get("samples", []):
            labels = s.get("labels") or {}
            text = _labels(tuple(labels), tuple(str(v) for v in labels.values()))
            lines.append(f"{s.get('name')}{text} {_number(float(s.get('value', 0)))}")
    return lines
