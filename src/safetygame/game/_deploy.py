"""Two deployable shortcuts of the game: the adaptive fast path and the traffic price.

- :func:`fast_path`: after a game restricted to {refusal, one candidate}, may the agent
  answer with that candidate without drawing the others? Only when the candidate alone is
  within every budget in the worst case, so the per-prompt guarantee holds on both paths.
  :func:`reads_refusal_helpfulness`: with the refusal's helpfulness read lazily, whether
  that check needs it read.
- :func:`best_response` and :func:`calibrate_price`: the traffic-level budget. A price of
  risk lambda is calibrated once on a dev set with the pooled game (:func:`solve_pooled`);
  each prompt then plays argmax_i M_i - lambda (Delta_i + 2 eps) in O(m).

``docs/method.md`` ("Adaptive sampling", "Traffic-level budget") has the proofs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from safetygame.game._core import FEAS_TOL, GameResult, Margins, Status
from safetygame.game._pooled import solve_pooled
from safetygame.game._validation import _bad, _batch_margins, _refusal_index, _scalar

#: Two best-response scores closer than this are a tie (settled towards less risk).
TIE_TOL = 1e-12


def _unit(x: float, name: str) -> float:
    v = _scalar(x, name)
    if v > 1.0:
        raise _bad(f"{name} must be in [0, 1] (got {v:g})")
    return v


def fast_path(
    result: GameResult,
    candidate: int,
    helpfulness: float,
    threshold: float,
    *,
    epsilon: float = 0.0,
) -> bool:
    """True when the adaptive agent may answer with ``candidate`` alone.

    ``result`` is the game restricted to the refusal and ``candidate`` (any mode);
    ``helpfulness`` is the candidate's own score h. All of these must hold: the solve
    succeeded; it puts all its mass on ``candidate``; the candidate's worst-case extra
    risk Delta + 2 ``epsilon`` is within every budget (checked here, so the fast path stays
    within T even under the hinge or soft cap, which may exceed T on purpose); and
    ``helpfulness >= threshold``.
    """
    mg = result.margins
    c = _refusal_index(candidate, mg.n_candidates)
    if c == mg.refusal:
        raise _bad("candidate must not be the refusal")
    h = _unit(helpfulness, "helpfulness")
    thr = _unit(threshold, "threshold")
    shift = 2.0 * _scalar(epsilon, "epsilon")
    if not result.success or result.strategy[c] < 1.0 - FEAS_TOL:
        return False
    worst = mg.Delta2d[:, c] + shift
    return bool((worst <= result.budget).all()) and h >= thr


def reads_refusal_helpfulness(
    helpfulness: ArrayLike, threshold: float, bound: float
) -> NDArray[np.bool_]:
    """``sampling.refusal_helpfulness: lazy``: whether the fast-path check must read the
    refusal's helpfulness, elementwise over first-candidate ``helpfulness`` readings. Only
    inside [``threshold``, ``bound``]: below the threshold the fast path is closed whatever
    the refusal reads, and above the bound the refusal counts as the bound, unread
    (docs/method.md, where the refusal reads at most the bound this decides as reading)."""
    h = np.asarray(helpfulness, dtype=float)
    out: NDArray[np.bool_] = (h >= threshold) & (h <= bound)
    return out


def _argmax_priced(M: list[float], Dw: list[float], s: int, price: float) -> int:
    """argmax M_i - price * Dw_i; near-ties (TIE_TOL) to less risk, the refusal, lower index."""
    score = [mi - price * di for mi, di in zip(M, Dw, strict=True)]
    top = max(score)
    near = [i for i, v in enumerate(score) if v >= top - TIE_TOL]
    return min(near, key=lambda i: (Dw[i], i != s, i))


def best_response(margins: Margins, price: float, *, epsilon: float = 0.0) -> int:
    """The candidate a prompt plays at a price of risk: argmax_i M_i - price * Dw_i.

    Dw_i = Delta_i + 2 ``epsilon`` off the refusal (0 at the refusal), the risk as the
    calibration charged it. O(m). Scores within :data:`TIE_TOL` of the best are ties, settled
    towards the lower charged risk, then the refusal, then the lower index: on calibration
    traffic this keeps every prompt at or below its pooled plan's risk (docs/method.md).
    One budget row only (the traffic budget is one pooled row).
    """
    if not isinstance(margins, Margins):
        raise _bad("margins must be a Margins (build it with safetygame.game.margins)")
    if margins.n_budgets != 1:
        raise _bad("best_response supports one budget row (traffic scope has one)")
    lam = _scalar(price, "price")
    shift = 2.0 * _scalar(epsilon, "epsilon")
    s = margins.refusal
    Dw = [0.0 if i == s else v + shift for i, v in enumerate(margins.Delta2d[0].tolist())]
    return _argmax_priced(margins.M.tolist(), Dw, s, lam)


@dataclass(frozen=True)
class PriceCalibration:
    """:func:`calibrate_price` output. ``price`` is lambda; ``mean_risk`` and ``mean_value``
    are what the per-prompt best response to it gives on the calibration prompts (the risk
    as charged: Delta + 2 eps off the refusal); ``pooled_value`` the pooled game's mean
    helpfulness, the ceiling. Check ``status`` first: on failure ``price`` is inf (refuse
    whenever any risk is charged)."""

    price: float
    budget: float
    epsilon: float
    n: int
    mean_risk: float
    mean_value: float
    pooled_value: float
    answered: float  # share of prompts whose best response is not the refusal
    status: Status
    message: str

    @property
    def success(self) -> bool:
        return self.status == Status.OPTIMAL


def calibrate_price(
    M: ArrayLike,
    Delta: ArrayLike,
    budget: float,
    mask: ArrayLike | None = None,
    *,
    refusal: int = 0,
    epsilon: float = 0.0,
) -> PriceCalibration:
    """The price of risk lambda for a traffic-level budget: mean extra risk <= T.

    Inputs as :func:`solve_pooled` ((n, m) margins of n dev prompts). lambda is the pooled
    game's price (its multiplier); the best response to it is then applied to every prompt,
    and its mean charged risk is re-checked against T (status ``NUMERICAL`` if it fails).
    """
    Ma, Da, valid, s = _batch_margins(M, Delta, mask, refusal)
    T = _scalar(budget, "budget")
    eps = _scalar(epsilon, "epsilon")
    n = Ma.shape[0]
    if n == 0:
        raise _bad("M has no prompts to calibrate on")
    pooled = solve_pooled(Ma, Da, T, valid, refusal=s, epsilon=eps)
    if not pooled.success:
        return PriceCalibration(
            math.inf, T, eps, n, 0.0, 0.0, 0.0, 0.0, pooled.status, pooled.message
        )
    lam = pooled.multiplier
    risk = value = answered = 0.0
    for p in range(n):
        cols = [int(j) for j in range(Ma.shape[1]) if valid[p, j]]
        Mp = [float(Ma[p, j]) for j in cols]
        Dw = [0.0 if j == s else float(Da[p, j]) + 2.0 * eps for j in cols]
        k = _argmax_priced(Mp, Dw, cols.index(s), lam)
        risk += Dw[k]
        value += Mp[k]
        answered += cols[k] != s
    mean_risk = risk / n
    if mean_risk > T + FEAS_TOL:
        return PriceCalibration(
            math.inf, T, eps, n, 0.0, 0.0, float(pooled.value.mean()), 0.0, Status.NUMERICAL,
            f"calibration: best response at price {lam:.6g} has mean risk {mean_risk:.6g} "
            f"over the budget {T:g}; refusing",
        )  # fmt: skip
    spent = "budget binds" if lam > 0.0 else "budget not binding: price 0"
    return PriceCalibration(
        lam,
        T,
        eps,
        n,
        mean_risk,
        value / n,
        float(pooled.value.mean()),
        answered / n,
        Status.OPTIMAL,
        f"optimal: price of risk over {n} prompts, {spent}",
    )
