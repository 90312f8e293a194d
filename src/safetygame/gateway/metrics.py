"""Prometheus metrics: values kept by ``prometheus_client``, exposed in text format 0.0.4.

One process: each :class:`GatewayMetrics` owns a ``CollectorRegistry`` (no global
registry) and ``/metrics`` renders it.

Several processes (``safetygame serve --workers N``): the supervisor gives its workers one
private, empty ``PROMETHEUS_MULTIPROC_DIR`` (:class:`SharedMetricsDir`). prometheus_client
then keeps every worker's values in memory-mapped files there, and a scrape of any worker
reads all of them (``MultiProcessCollector``): counters and histograms are summed over the
workers, dead ones included (a restart loses no count), and the in-flight gauge over the
live ones (the supervisor marks a worker dead when it exits). So ``/metrics`` gives the
totals whichever worker answers the scrape.

The exposition keeps the names, label order and number format the gateway always had
(``safetygame_requests_total{tenant="default",code="200"} 4``; ``le`` last); the
``_created`` samples prometheus_client adds are left out.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

from safetygame.errors import ConfigError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# prometheus_client's own switch: set in a process's environment before it imports
# prometheus_client, it stores values in files under that folder (multiprocess mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


def multiprocess_dir() -> str | None:
    """The shared metrics folder this process writes to, or None (single process)."""
    return os.environ.get(MULTIPROC_ENV) or None


def multiprocess_values() -> bool:
    """Whether prometheus_client stores this process's values in files (its multiprocess
    mode), which it decides once, at import, from ``PROMETHEUS_MULTIPROC_DIR``."""
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


class SharedMetricsDir:
    """A private, empty ``PROMETHEUS_MULTIPROC_DIR`` for one supervisor's workers.

    Give ``env()`` to each worker, call ``process_exited(pid)`` when one exits (its live
    gauges stop counting) and ``close()`` at the end (the folder is removed)."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="safetygame-metrics-")

    def env(self) -> dict[str, str]:
        return {MULTIPROC_ENV: self.path}

    def process_exited(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, self.path)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Counter:
    """A counter with the gateway's call style: ``inc(amount, **labels)``."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help_: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._metric = self._make(registry)

    def _make(self, registry: CollectorRegistry) -> prometheus_client.Counter:
        return prometheus_client.Counter(self.name, self.help, self.labelnames, registry=registry)

    def _child(self, labels: dict[str, str]) -> Any:  # a Counter's or a Gauge's child
        return self._metric.labels(**labels) if self.labelnames else self._metric

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).inc(amount)

    def get(self, **labels: str) -> float:
        """This process's value."""
        return float(self._child(labels)._value.get())


class Gauge(Counter):
    """A gauge; under several workers it is the sum over the live ones."""

    kind = "gauge"

    def _make(self, registry: CollectorRegistry) -> prometheus_client.Gauge:  # type: ignore[override]
        return prometheus_client.Gauge(
            self.name, self.help, self.labelnames, registry=registry, multiprocess_mode="livesum"
        )

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).dec(amount)


class Histogram:
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._metric = prometheus_client.Histogram(
            name, help_, self.labelnames, registry=registry, buckets=self.buckets
        )

    def observe(self, value: float, **labels: str) -> None:
        (self._metric.labels(**labels) if self.labelnames else self._metric).observe(value)


Metric = Counter | Histogram


class GatewayMetrics:
    """Every metric the gateway exports; under ``PROMETHEUS_MULTIPROC_DIR`` (a worker of
    ``serve --workers N``) the totals over every worker's files in that folder.

    ConfigError if that variable is set but prometheus_client was imported before it was:
    its values would then stay in this process's memory and every scrape would read zeros.
    """

    def __init__(self) -> None:
        self.directory = multiprocess_dir()
        if self.directory is not None and not multiprocess_values():
            raise ConfigError(
                f"{MULTIPROC_ENV}={self.directory} was set after prometheus_client was "
                "imported, so this process keeps its metrics in memory and /metrics would "
                f"read zeros from the folder: set {MULTIPROC_ENV} in the environment before "
                "the process starts (serve --workers N does this for its workers), or unset it"
            )
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "safetygame_requests_total",
            "HTTP requests to the chat endpoint.",
            ("tenant", "code"),
            registry=r,
        )
        self.decisions = Counter(
            "safetygame_decisions_total",
            "Decisions made.",
            ("tenant", "status", "action"),
            registry=r,
        )
        self.refusals = Counter(
            "safetygame_refusals_total",
            "Refusals sent (status ok = the game chose to refuse; other = fail-safe).",
            ("tenant", "status"),
            registry=r,
        )
        self.upstream_errors = Counter(
            "safetygame_upstream_errors_total",
            "Failed calls to the upstream model.",
            ("operation", "error"),
            registry=r,
        )
        self.upstream_calls = Counter(
            "safetygame_upstream_calls_total",
            "Calls to the upstream model.",
            ("operation",),
            registry=r,
        )
        self.latency = Histogram(
            "safetygame_decision_latency_seconds",
            "Time from request to a decided, audited response.",
            LATENCY_BUCKETS,
            ("tenant",),
            registry=r,
        )
        self.overhead = Histogram(
            "safetygame_gateway_overhead_seconds",
            "Request time not spent waiting for the upstream model.",
            OVERHEAD_BUCKETS,
            registry=r,
        )
        self.audit_errors = Counter(
            "safetygame_audit_errors_total",
            "Decisions that could not be written (503 sent).",
            registry=r,
        )
        self.policy_reloads = Counter(
            "safetygame_policy_reloads_total",
            "Policy and tenants file reloads (result ok or rejected).",
            ("tenant", "result"),
            registry=r,
        )
        self.in_flight = Gauge(
            "safetygame_requests_in_flight",
            "Chat requests being decided or recorded.",
            registry=r,
        )
        self._order: tuple[Metric, ...] = (
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
        )

    def samples(self) -> dict[str, list[tuple[str, dict[str, str], float]]]:
        """(sample name, labels, value) per metric name: this process's registry, or the
        sum over every worker's files in multiprocess mode."""
        if self.directory is None:
            families: Iterable[prometheus_client.Metric] = self.registry.collect()
        else:
            shared = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(shared, path=self.directory)
            families = shared.collect()
        out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for family in families:
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out.setdefault(family.name, []).append((s.name, dict(s.labels), s.value))
        return out

    def render(self) -> str:
        found = self.samples()
        lines: list[str] = []
        for m in self._order:
            family = m.name.removesuffix("_total") if m.kind == "counter" else m.name
            lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}"]
            rows = found.get(family, [])
            if isinstance(m, Histogram):
                lines += _histogram_lines(m, rows)
            else:
                rows = sorted(rows, key=lambda r: _key(m.labelnames, r[1]))
                lines += [
                    f"{m.name}{_fmt_labels(m.labelnames, lab)} {_fmt_num(v)}" for _, lab, v in rows
                ]
                if not rows and not m.labelnames and m.kind == "gauge":
                    lines.append(f"{m.name} 0")
        return "\n".join(lines) + "\n"


def _histogram_lines(m: Histogram, rows: list[tuple[str, dict[str, str], float]]) -> list[str]:
    """Per series (sorted by labels): the cumulative buckets by bound, ``_sum``, ``_count``."""
    series: dict[tuple[str, ...], dict[str, float]] = {}
    for name, labels, value in rows:
        key = _key(m.labelnames, labels)
        suffix = name.removeprefix(m.name)
        slot = f"le={labels['le']}" if suffix == "_bucket" else suffix
        series.setdefault(key, {})[slot] = value
    out = []
    for key, values in sorted(series.items()):
        labels = dict(zip(m.labelnames, key, strict=True))
        for bound in (*m.buckets, math.inf):
            count = values.get(f"le={floatToGoString(bound)}", 0.0)
            text = _fmt_labels((*m.labelnames, "le"), {**labels, "le": _fmt_num(bound)})
            out.append(f"{m.name}_bucket{text} {_fmt_num(count)}")
        text = _fmt_labels(m.labelnames, labels)
        out.append(f"{m.name}_sum{text} {_fmt_num(values.get('_sum', 0.0))}")
        out.append(f"{m.name}_count{text} {_fmt_num(values.get('_count', 0.0))}")
    return out


def _key(labelnames: Sequence[str], labels: dict[str, str]) -> tuple[str, ...]:
    return tuple(labels.get(k, "") for k in labelnames)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(names: Sequence[str], labels: dict[str, str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{k}="{_escape(labels[k])}"' for k in names) + "}"


def _fmt_num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))
