"""Retry policy of the HTTP backends: which upstream answers are retried, and how long to wait.

``classify_status(status, headers)`` is a pure function from an HTTP status and its headers
to a ``StatusClass``: ``ok`` (< 400), ``rate_limited`` (429) and ``retry`` (408, 500, 502,
503, 504: retried, honouring ``Retry-After``), ``unsupported`` (404, 405, 501: the server
lacks the endpoint), ``rejected`` (400, 413, 422: the request itself was refused, e.g. a
prompt longer than the context) and ``error`` (anything else). ``RetryPolicy`` spaces the
retries (exponential backoff with full jitter, capped).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from safetygame.errors import ConfigError

__all__ = [
    "RETRY_STATUS",
    "RetryPolicy",
    "StatusClass",
    "StatusKind",
    "classify_status",
    "parse_retry_after",
]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
UNSUPPORTED_STATUS = frozenset({404, 405, 501})
REJECTED_STATUS = frozenset({400, 413, 422})

StatusKind = Literal["ok", "rate_limited", "retry", "unsupported", "rejected", "error"]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: attempt k (0-based) waits uniform(0, min(cap, base * 2**k)) seconds."""

    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    retry_after_cap: float = 30.0  # never sleep longer than this on a server's say-so

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError("max_retries must be >= 0")
        if not (self.backoff_base >= 0 and self.backoff_cap >= 0):
            raise ConfigError("backoff_base and backoff_cap must be >= 0")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2.0**attempt))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(seconds, 0.0) if math.isfinite(seconds) else None


@dataclass(frozen=True)
class StatusClass:
    """What an upstream's HTTP status means for the caller (see ``classify_status``)."""

    kind: StatusKind
    retry_after: float | None = None  # seconds the server asked for (retryable kinds only)

    @property
    def retryable(self) -> bool:
        return self.kind in ("rate_limited", "retry")


def classify_status(
    status: int, headers: Mapping[str, str], now: float | None = None
) -> StatusClass:
    """Classify one HTTP answer. ``headers`` is looked up by lower-case name (``Reply``'s
    dict, or httpx's case-insensitive ``Headers``); ``now``: epoch seconds for an HTTP-date
    ``Retry-After`` (default: the clock)."""
    if status < 400:
        return StatusClass("ok")
    if status in RETRY_STATUS:
        kind: StatusKind = "rate_limited" if status == 429 else "retry"
        return StatusClass(kind, parse_retry_after(headers.get("retry-after"), now))
    if status in UNSUPPORTED_STATUS:
        return StatusClass("unsupported")
    if status in REJECTED_STATUS:
        return StatusClass("rejected")
    return StatusClass("error")
