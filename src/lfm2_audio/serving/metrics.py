"""Prometheus text-format metrics, without the client library: counters, gauges, histograms.

Observations come from the event loop, the engine thread and the codec thread, so each
metric takes a small lock.
"""

from __future__ import annotations

import threading
from typing import Callable

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in sorted(labels.items()))
    return "{" + body + "}"


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}
        self.lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self):
        with self.lock:
            items = list(self.values.items()) or [((), 0.0)]
        for key, v in items:
            yield self.name + ("_total" if not self.name.endswith("_total") else ""), dict(key), v


class Gauge:
    """A value read when scraped (a callable), so it is never stale."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def samples(self):
        yield self.name, {}, float(self.read())


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets=DEFAULT_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.sum += value
            self.count += 1
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1

    def samples(self):
        with self.lock:
            counts, total, n = list(self.counts), self.sum, self.count
        for b, c in zip(self.buckets, counts):
            yield self.name + "_bucket", {"le": repr(float(b))}, c
        yield self.name + "_bucket", {"le": "+Inf"}, n
        yield self.name + "_sum", {}, total
        yield self.name + "_count", {}, n


class Metrics:
    def __init__(self):
        self.items: list = []
        self.requests = self.add(Counter("lfm2_requests", "Requests handled, by endpoint and outcome"))
        self.errors = self.add(Counter("lfm2_errors", "Error events and error responses sent, by code"))
        self.barge_ins = self.add(Counter("lfm2_barge_ins", "Replies cut short because the user started talking"))
        self.audio_seconds = self.add(Counter("lfm2_output_audio_seconds", "Seconds of reply audio sent"))
        self.ttfa = self.add(Histogram("lfm2_time_to_first_audio_seconds", "From the end of the user's turn (request, commit) to the first audio sent"))
        self.ttft = self.add(Histogram("lfm2_time_to_first_token_seconds", "From the end of the user's turn to the first text sent"))
        self.step = self.add(Histogram("lfm2_engine_step_seconds", "Duration of one batched decode step", STEP_BUCKETS))
        self.barge_in_latency = self.add(Histogram("lfm2_barge_in_seconds", "From detected speech to the reply stopped", STEP_BUCKETS))

    def add(self, metric):
        self.items.append(metric)
        return metric

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.add(Gauge(name, help, read))

    def counter_fn(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A counter whose value lives elsewhere (e.g. the engine's stats)."""
        g = Gauge(name, help, read)
        g.kind = "counter"
        self.add(g)

    def render(self) -> str:
        lines = []
        for m in self.items:
            base = m.name + ("_total" if m.kind == "counter" and isinstance(m, Counter) and not m.name.endswith("_total") else "")
            lines.append(f"# HELP {base} {m.help}")
            lines.append(f"# TYPE {base} {m.kind}")
            for name, labels, value in m.samples():
                lines.append(f"{name}{_labels(labels)} {value:.9g}" if isinstance(value, float) else f"{name}{_labels(labels)} {value}")
        return "\n".join(lines) + "\n"
