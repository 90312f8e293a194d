"""Uncertainty and tuning for score-based evaluations.

- :func:`bootstrap_ci`: percentile bootstrap interval of a mean (seeded, vectorised).
- :func:`paired_bootstrap`: method A vs B on the same items: mean difference, its interval
  and a two-sided p-value.
- :func:`choose_budget`: the anti-overfit rule. Keep the current budget unless the dev
  evidence separates the dev-best candidate from it (docs/evaluation.md, "Tuning rule").
- :func:`tune_budget`: that rule over a grid of (T, beta) on a multiple-choice dev table,
  scored by expected accuracy.
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
    "BudgetChoice",
    "Candidate",
    "Interval",
    "PairedDifference",
    "bootstrap_ci",
    "choose_budget",
    "grid_candidates",
    "min_separable_n",
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


#: A point of the tuning grid: (budget T, beta); beta None is the hard budget (the LP).
Candidate = tuple[float, float | None]


def min_separable_n(confidence: float) -> int:
    """The fewest paired items whose signs could tell two candidates apart at ``confidence``.

    Even when every item favours one side, a two-sided sign test gives p = 2 * 0.5**n; below
    this n that is never under 1 - confidence (at 0.95: n >= 6), and a percentile bootstrap
    of so few items is degenerate (one item: the interval is a point).
    """
    _check(1, confidence)
    n = 1
    while 2.0 * 0.5**n >= 1.0 - confidence:
        n += 1
    return n


@dataclass(frozen=True)
class BudgetChoice:
    """What :func:`choose_budget` decided, with the evidence behind it.

    ``budget``/``beta`` are the values to use: the dev-best candidate when ``adopted``, else
    ``current``. ``score`` is their mean dev score and ``score_ci`` its bootstrap interval;
    ``budget_ci`` is the bootstrap interval of the T the dev-best pick lands on when the dev
    items are resampled (how stable the pick is). ``gain`` is the paired bootstrap of best
    minus current on dev (None when the best is the current). ``grid`` has every candidate
    tried as (T, beta, mean dev score), in candidate order.
    """

    budget: float
    beta: float | None
    score: float
    score_ci: tuple[float, float]
    adopted: bool
    reason: str
    best: Candidate
    best_score: float
    current: Candidate
    current_score: float
    gain: PairedDifference | None
    budget_ci: tuple[float, float]
    n: int
    grid: tuple[tuple[float, float | None, float], ...]

    @property
    def accuracy(self) -> float:
        """The chosen candidate's mean dev score (expected accuracy in the MC harness)."""
        return self.score

    def summary(self) -> dict[str, object]:
        """The JSON shape the eval logs and ``safetygame tune`` report."""
        return {
            "budget": self.budget,
            "beta": self.beta,
            "dev_score": self.score,
            "dev_ci": list(self.score_ci),
            "budget_ci": list(self.budget_ci),
            "adopted": self.adopted,
            "reason": self.reason,
            "best": {"budget": self.best[0], "beta": self.best[1], "dev_score": self.best_score},
            "current": {
                "budget": self.current[0],
                "beta": self.current[1],
                "dev_score": self.current_score,
            },
            "gain": None
            if self.gain is None
            else {"diff": self.gain.diff, "ci": [self.gain.low, self.gain.high]},
            "n_dev": self.n,
        }


def _resampled_candidate_means(scores: FloatArray, n_resamples: int, seed: int) -> FloatArray:
    """(n_resamples, candidates) mean scores over bootstrap resamples of the items (columns),
    every candidate on the same resample; in blocks, so memory stays bounded."""
    rng = np.random.default_rng(seed)
    n = scores.shape[1]
    block = max(1, _BLOCK_CELLS // n)
    out = np.empty((n_resamples, scores.shape[0]))
    for lo in range(0, n_resamples, block):
        hi = min(n_resamples, lo + block)
        idx = rng.integers(0, n, size=(hi - lo, n))
        flat = (idx + (np.arange(hi - lo) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=(hi - lo) * n).reshape(hi - lo, n)
        out[lo:hi] = (counts @ scores.T) / n
    return out


def _first_best(means: FloatArray) -> NDArray[np.int_]:
    """Index of the first maximum along the last axis (ties within 1e-12 go to the earlier)."""
    top = means.max(axis=-1, keepdims=True)
    out: NDArray[np.int_] = np.argmax(means >= top - 1e-12, axis=-1)
    return out


def choose_budget(
    candidates: Sequence[Candidate],
    scores: ArrayLike,
    current: Candidate,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BudgetChoice:
    """The tuning rule: keep ``current`` unless the dev evidence separates the dev-best.

    ``scores[k, i]`` is candidate k's score on dev item i (higher is better); ``candidates``
    must hold ``current``, and their order breaks ties (callers list T ascending, so the
    smaller budget wins a tie). The dev-best candidate is the current one if it has the
    highest mean, else the first with the highest mean.
    It is adopted iff (1) it differs from ``current``, (2) there are at least
    :func:`min_separable_n` dev items, and (3) the lower end of the paired percentile
    bootstrap interval (``confidence``, two-sided) of its per-item score minus the current
    one's is above 0. Otherwise the current budget is kept. Pure: seeded, no I/O.
    """
    _check(n_resamples, confidence)
    cands = [(float(T), None if b is None else float(b)) for T, b in candidates]
    cur = (float(current[0]), None if current[1] is None else float(current[1]))
    if not cands:
        raise ConfigError("choose_budget: no candidates")
    if cur not in cands:
        raise ConfigError(f"choose_budget: the current budget {cur} is not among the candidates")
    S = np.asarray(scores, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != len(cands) or S.shape[1] == 0:
        raise ConfigError(
            f"choose_budget: scores must be (candidates, items) = ({len(cands)}, n >= 1), "
            f"not {S.shape}"
        )
    if not np.all(np.isfinite(S)):
        raise ConfigError("choose_budget: scores must be finite")
    n = S.shape[1]
    means = S.mean(axis=1)
    k_cur = cands.index(cur)
    # A candidate that only ties the current one is no reason to move: the current wins ties.
    k_best = k_cur if means[k_cur] >= means.max() - 1e-12 else int(_first_best(means))
    gain: PairedDifference | None = None
    if k_best == k_cur:
        adopted, reason = False, "the current budget scores best on dev"
    else:
        gain = paired_bootstrap(
            S[k_best], S[k_cur], n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        need = min_separable_n(confidence)
        if n < need:
            adopted = False
            reason = f"{n} dev item(s) cannot separate candidates (needs >= {need}): kept"
        elif gain.low > 0.0:
            adopted = True
            reason = (
                f"best beats current on dev: {gain.diff:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}]"
            )
        else:
            adopted = False
            reason = (
                f"best vs current on dev {gain.diff:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}] "
                "includes 0: kept"
            )
    k = k_best if adopted else k_cur
    # How stable the pick is: the T the same rule's argmax lands on over dev resamples.
    boot_means = _resampled_candidate_means(S, n_resamples, seed)
    picks = _first_best(boot_means)
    cur_top = boot_means[:, k_cur] >= boot_means.max(axis=1) - 1e-12  # the current wins ties
    picked_T = np.array([c[0] for c in cands])[np.where(cur_top, k_cur, picks)]
    alpha = (1.0 - confidence) / 2.0
    t_lo, t_hi = np.quantile(picked_T, [alpha, 1.0 - alpha])
    iv = bootstrap_ci(S[k], n_resamples=n_resamples, confidence=confidence, seed=seed)
    return BudgetChoice(
        budget=cands[k][0],
        beta=cands[k][1],
        score=float(means[k]),
        score_ci=(iv.low, iv.high),
        adopted=adopted,
        reason=reason,
        best=cands[k_best],
        best_score=float(means[k_best]),
        current=cur,
        current_score=float(means[k_cur]),
        gain=gain,
        budget_ci=(float(t_lo), float(t_hi)),
        n=n,
        grid=tuple((T, b, float(m)) for (T, b), m in zip(cands, means, strict=True)),
    )


def grid_candidates(
    budgets: Sequence[float], betas: Sequence[float | None], current: Candidate
) -> list[Candidate]:
    """T ascending, then ``betas`` in order, with ``current`` added where it sorts if absent."""
    if len(budgets) == 0:
        raise ConfigError("tune_budget: grid is empty")
    if len(betas) == 0:
        raise ConfigError("tune_budget: betas is empty")
    out = [(float(T), b) for T in sorted(float(x) for x in budgets) for b in betas]
    cur = (float(current[0]), current[1])
    if cur not in out:
        at = next((i for i, c in enumerate(out) if c[0] > cur[0]), len(out))
        out.insert(at, cur)
    return out


def tune_budget(
    table_dev: ScoreTable,
    method: str | Method,
    grid: Sequence[float],
    *,
    current: Candidate,
    betas: Sequence[float | None] = (None,),
    params: MethodParams | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BudgetChoice:
    """:func:`choose_budget` over (T in ``grid``) x ``betas`` plus ``current``, each scored
    per dev item by expected accuracy. Only cached scores are used: no model is queried."""
    base = params or MethodParams()
    cands = grid_candidates(grid, betas, current)
    scores = [
        expected_accuracy(run_method(method, table_dev, replace(base, budget=T, beta=b)), table_dev)
        for T, b in cands
    ]
    return choose_budget(
        cands, np.array(scores), current, n_resamples=n_resamples, confidence=confidence, seed=seed
    )
