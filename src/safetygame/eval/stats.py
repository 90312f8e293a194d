"""Uncertainty and tuning for score-based evaluations.

- :func:`bootstrap_ci`: percentile bootstrap interval of a mean (seeded, vectorised).
- :func:`paired_bootstrap`: method A vs B on the same items: mean difference, its interval
  and a two-sided p-value.
- :func:`tune_budget`: pick the budget T (and beta) on a dev split by expected accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from safetygame.errors import ConfigError
from safetygame.eval.methods import (
    Method,
    MethodParams,
    ScoreTable,
    expected_accuracy,
    run_method,
)

__all__ = [
    "Interval",
    "PairedDifference",
    "TuneResult",
    "bootstrap_ci",
    "paired_bootstrap",
    "tune_budget",
]

FloatArray = NDArray[np.float64]

# Resample in blocks so memory stays bounded (block x n indices at a time).
_BLOCK_CELLS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval at ``confidence``."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    n_resamples: int


@dataclass(frozen=True)
class PairedDifference:
    """Mean of A - B over paired items, its interval and a two-sided bootstrap p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float
    n_resamples: int


def _values(x: ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ConfigError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} must be finite")
    return arr


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ConfigError("n_resamples must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ConfigError("confidence must be in (0, 1)")


def _resampled_means(values: FloatArray, n_resamples: int, seed: int) -> FloatArray:
    """Means of ``n_resamples`` bootstrap resamples (with replacement) of ``values``."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    block = max(1, _BLOCK_CELLS // n)
    out = np.empty(n_resamples)
    for lo in range(0, n_resamples, block):
        hi = min(n_resamples, lo + block)
        idx = rng.integers(0, n, size=(hi - lo, n))
        out[lo:hi] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: ArrayLike,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. per-item accuracies)."""
    _check(n_resamples, confidence)
    v = _values(values, "values")
    means = _resampled_means(v, n_resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(v.mean()), float(low), float(high), v.size, confidence, n_resamples)


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Compare two methods scored on the same items (``a[i]`` and ``b[i]`` on item i).

    The items are resampled together, so the interval reflects the paired design. The
    p-value tests "no difference" by centring the bootstrap differences on zero:
    p = (1 + #{|d* - d| >= |d|}) / (1 + R), two-sided.
    """
    _check(n_resamples, confidence)
    va = _values(a, "a")
    vb = _values(b, "b")
    if va.shape != vb.shape:
        raise ConfigError(f"a and b must be paired: {va.size} vs {vb.size} values")
    d = va - vb
    diff = float(d.mean())
    boots = _resampled_means(d, n_resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    extreme = int(np.sum(np.abs(boots - diff) >= abs(diff) - 1e-15))
    p = (1 + extreme) / (1 + n_resamples)
    return PairedDifference(
        diff, float(low), float(high), min(1.0, p), d.size, confidence, n_resamples
    )


@dataclass(frozen=True)
class TuneResult:
    """The chosen budget (and beta), its dev accuracy, and every grid point tried."""

    budget: float
    beta: float | None
    accuracy: float
    grid: tuple[tuple[float, float | None, float], ...]


def tune_budget(
    table_dev: ScoreTable,
    method: str | Method,
    grid: Sequence[float],
    *,
    betas: Sequence[float | None] = (None,),
    params: MethodParams | None = None,
) -> TuneResult:
    """Pick T (and beta) maximising mean expected accuracy on the dev table.

    Ties go to the smaller T (the safer budget), then to the earlier beta in ``betas``.
    Only cached scores are used: no model is queried.
    """
    if len(grid) == 0:
        raise ConfigError("tune_budget: grid is empty")
    if len(betas) == 0:
        raise ConfigError("tune_budget: betas is empty")
    base = params or MethodParams()
    tried: list[tuple[float, float | None, float]] = []
    for T in sorted(float(x) for x in grid):
        for beta in betas:
            p = replace(base, budget=T, beta=beta)
            acc = float(expected_accuracy(run_method(method, table_dev, p), table_dev).mean())
            tried.append((T, beta, acc))
    best = max(tried, key=lambda r: r[2])[2]
    # First hit in (T ascending, betas order) among the best: the smallest T wins ties.
    T, beta, acc = next(r for r in tried if r[2] >= best - 1e-12)
    return TuneResult(T, beta, acc, tuple(tried))
