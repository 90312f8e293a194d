"""Prometheus metrics, written by hand in the text exposition format (version 0.0.4).

A handful of counters and histograms, owned by one app instance (no global registry), and
updated from the event loop only, so no locks are needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple((k, labels[k]) for k in self.labelnames)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple((k, labels[k]) for k in self.labelnames), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [
            f"{self.name}{_fmt_labels(k)} {_fmt_num(v)}" for k, v in sorted(self.values.items())
        ]
        return out


class Gauge(Counter):
    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def render(self) -> list[str]:
        lines = super().render()
        lines[1] = f"# TYPE {self.name} gauge"
        if not self.values and not self.labelnames:
            lines.append(f"{self.name} 0")
        return lines


class Histogram:
    def __init__(
        self, name: str, help_: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple((k, labels[k]) for k in self.labelnames)
        counts, acc = self.series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        acc[0] += value

    def count(self, **labels: str) -> int:
        key = tuple((k, labels[k]) for k in self.labelnames)
        return sum(self.series[key][0]) if key in self.series else 0

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, acc) in sorted(self.series.items()):
            cum = 0
            for b, c in zip((*self.buckets, math.inf), counts, strict=True):
                cum += c
                out.append(f"{self.name}_bucket{_fmt_labels(key, (('le', _fmt_num(b)),))} {cum}")
            out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_num(acc[0])}")
            out.append(f"{self.name}_count{_fmt_labels(key)} {cum}")
        return out


class GatewayMetrics:
    """Every metric the gateway exports."""

    def __init__(self) -> None:
        self.requests = Counter(
            "safetygame_requests_total", "HTTP requests to the chat endpoint.", ("tenant", "code")
        )
        self.decisions = Counter(
            "safetygame_decisions_total", "Decisions made.", ("tenant", "status", "action")
        )
        self.refusals = Counter(
            "safetygame_refusals_total",
            "Refusals sent (status ok = the game chose to refuse; other = fail-safe).",
            ("tenant", "status"),
        )
        self.upstream_errors = Counter(
            "safetygame_upstream_errors_total",
            "Failed calls to the upstream model.",
            ("operation", "error"),
        )
        self.upstream_calls = Counter(
            "safetygame_upstream_calls_total", "Calls to the upstream model.", ("operation",)
        )
        self.latency = Histogram(
            "safetygame_decision_latency_seconds",
            "Time from request to a decided, audited response.",
            LATENCY_BUCKETS,
            ("tenant",),
        )
        self.overhead = Histogram(
            "safetygame_gateway_overhead_seconds",
            "Request time not spent waiting for the upstream model.",
            OVERHEAD_BUCKETS,
        )
        self.audit_errors = Counter(
            "safetygame_audit_errors_total", "Decisions that could not be written (503 sent)."
        )
        self.policy_reloads = Counter(
            "safetygame_policy_reloads_total",
            "Policy and tenants file reloads (result ok or rejected).",
            ("tenant", "result"),
        )
        self.in_flight = Gauge(
            "safetygame_requests_in_flight", "Chat requests being decided or recorded."
        )

    def render(self) -> str:
        parts: list[str] = []
        for m in (
            self.requests,
            self.decisions,
            self.refusals,
            self.upstream_calls,
            self.upstream_errors,
            self.latency,
            self.overhead,
            self.audit_errors,
            self.policy_reloads,
            self.in_flight,
        ):
            parts += m.render()
        return "\n".join(parts) + "\n"
