"""The hard game for many prompts under one pooled budget (a fractional knapsack)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from safetygame.game._core import FEAS_TOL, Status
from safetygame.game._exact import _upper_hull
from safetygame.game._validation import FloatArray, _batch_margins, _scalar


@dataclass(frozen=True)
class PooledResult:
    """:func:`solve_pooled` output: one row per prompt, one budget and one price for all.

    ``multiplier`` is the shared price of risk, d(mean value)/dT (right derivative);
    ``expected_risk`` may exceed the budget on some prompts: only ``mean_risk`` is bound.
    """

    strategy: FloatArray  # (n, m)
    value: FloatArray  # (n,), pi.M per prompt
    expected_risk: FloatArray  # (n,), pi.Delta per prompt
    mean_risk: float
    budget: float
    multiplier: float
    status: Status
    message: str

    @property
    def success(self) -> bool:
        return self.status == Status.OPTIMAL


def solve_pooled(
    M: ArrayLike,
    Delta: ArrayLike,
    budget: float,
    mask: ArrayLike | None = None,
    *,
    refusal: int = 0,
    epsilon: float = 0.0,
) -> PooledResult:
    """The hard game for n prompts under one *pooled* budget: mean extra risk <= T.

        max  sum_p pi_p.M_p   s.t.  sum_p pi_p.Delta_p <= n T,  each pi_p a distribution

    Unlike :func:`solve_batch` (pi_p.Delta_p <= T for every p), risk saved on one prompt
    may be spent on another, so no single answer is bound. The LP has one coupling row, so
    it is a fractional knapsack over the prompts' hull edges: start each prompt at its
    least risky hull vertex, then take edges by decreasing slope (helpfulness per unit of
    risk) while the pool lasts; at most one prompt ends on a mix. Every prompt then plays
    a best response to the same price, the last slope taken. Inputs (``epsilon`` too: the
    pool is charged Delta + 2 eps off the refusal) as in :func:`solve_batch`; ties go to
    the lower prompt index.
    """
    Ma, Da, valid, s = _batch_margins(M, Delta, mask, refusal)
    T = _scalar(budget, "budget")
    eps = _scalar(epsilon, "epsilon")
    n, m = Ma.shape
    Dw = Da + 2.0 * eps  # risk as charged to the pool
    Dw[:, s] = 0.0
    pos: list[list[int]] = []  # each prompt's hull, as column indices
    edges: list[tuple[float, int, int]] = []  # (-slope, prompt, edge number)
    for p in range(n):
        cols = np.flatnonzero(valid[p])
        D, Mp = Dw[p, cols].tolist(), Ma[p, cols].tolist()
        hull = [int(cols[k]) for k in _upper_hull(D, Mp, int(np.searchsorted(cols, s)))]
        pos.append(hull)
        for k in range(len(hull) - 1):
            a, b = hull[k], hull[k + 1]
            edges.append((-(Ma[p, b] - Ma[p, a]) / (Dw[p, b] - Dw[p, a]), p, k))
    # Hull slopes fall along each prompt's hull, so this order takes a prompt's edges in turn.
    edges.sort()
    at = np.zeros(n, dtype=np.intp)  # edges taken in full, per prompt
    frac = np.zeros(n)
    pool = n * T - sum(float(Dw[p, pos[p][0]]) for p in range(n))
    price = 0.0
    for neg_slope, p, k in edges:
        a, b = pos[p][k], pos[p][k + 1]
        cost = float(Dw[p, b] - Dw[p, a])
        if cost > pool:  # also when the pool ran out on a vertex (frac 0): price = next slope
            frac[p], price = pool / cost, -neg_slope
            break
        pool -= cost
        at[p] += 1
    strategy = np.zeros((n, m))
    for p in range(n):
        a = pos[p][at[p]]
        strategy[p, a] = 1.0 - frac[p]
        if frac[p] > 0.0:
            strategy[p, pos[p][at[p] + 1]] += frac[p]
    value = (strategy * Ma).sum(axis=1)
    risk = (strategy * Da).sum(axis=1)
    mean = float(risk.mean()) if n else 0.0
    worst = float((strategy * Dw).sum(axis=1).mean()) if n else 0.0
    if worst > T + FEAS_TOL or not np.all(np.isfinite(value)):
        strategy = np.zeros((n, m))
        strategy[:, s] = 1.0
        zero = np.zeros(n)
        return PooledResult(
            strategy, zero, zero, 0.0, T, 0.0, Status.NUMERICAL,
            "pooled: solution failed the re-check (mean risk over the budget); refusing",
        )  # fmt: skip
    spent = "budget binds" if price > 0.0 else "budget not binding"
    return PooledResult(
        strategy,
        value,
        risk,
        mean,
        T,
        price,
        Status.OPTIMAL,
        f"optimal: pooled over {n} prompts, {spent}",
    )
