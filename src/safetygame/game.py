"""The Safety Game's mathematical core: margins, solvers, sampling.

Pure math (numpy, scipy): no I/O, no model code, no logging setup. The method is
Nguyen & Tran-Thanh, "Safety Game", arXiv:2510.09330 (ICML 2026); ``docs/method.md``
gives the math of every solver mode, the tie-breaking rule and the status codes.

Scores are probabilities: ``helpfulness`` h and ``harm`` d per candidate, one of which
(``refusal``) is the safe refusal s. Margins are relative to refusing: M_i = h_i - h_s,
Delta_i = d_i - d_s. Given a budget T the hard game is the LP

    max_pi  pi.M   s.t.  pi.Delta <= T,  sum(pi) = 1,  pi >= 0

which :func:`solve` answers exactly on the upper concave hull of the (Delta, M) points
(at most two candidates in the support), or through HiGHS (``method="highs"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from safetygame.errors import ConfigError

__all__ = [
    "BatchResult",
    "GameResult",
    "Margins",
    "PooledResult",
    "Status",
    "choose",
    "margins",
    "solve",
    "solve_batch",
    "solve_pooled",
]

FloatArray = NDArray[np.float64]
Method = Literal["auto", "exact", "highs"]

#: Tolerance of the feasibility re-check done on every returned strategy.
FEAS_TOL = 1e-9


class Status(IntEnum):
    """Outcome of a solve; the codes follow ``scipy.optimize.linprog``.

    Refusing is an *optimal* answer (status 0): check ``GameResult.refuses``.
    """

    OPTIMAL = 0
    ITERATION_LIMIT = 1
    INFEASIBLE = 2
    UNBOUNDED = 3
    NUMERICAL = 4


# --------------------------------------------------------------------------- validation


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"Invalid input: {msg}")


def _index_str(idx: tuple[int, ...]) -> str:
    return ", ".join(str(int(i)) for i in idx)


def _float_array(x: ArrayLike, name: str) -> FloatArray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _bad(f"{name} must be an array of numbers") from exc
    if arr.size == 0:
        raise _bad(f"{name} is empty")
    return arr


def _diagnose(arr: FloatArray, name: str, lo: float, hi: float) -> ConfigError:
    """The first offending entry of ``arr``, named (only called on the failure path)."""
    for idx in np.ndindex(arr.shape):
        v = float(arr[idx])
        where = f"{name}[{_index_str(idx)}]"
        if math.isnan(v):
            return _bad(f"{where} is NaN")
        if math.isinf(v):
            return _bad(f"{where} is inf")
        if not lo <= v <= hi:
            return _bad(f"{where} must be in [{lo:g}, {hi:g}] (got {v:g})")
    return _bad(f"{name} is invalid")  # pragma: no cover - only reached on a logic error


def _check_range(arr: FloatArray, name: str, lo: float, hi: float) -> None:
    # min/max propagate NaN, so the comparisons also reject NaN (and inf).
    if not (lo <= arr.min() and arr.max() <= hi):
        raise _diagnose(arr, name, lo, hi)


def _check_unit(arr: FloatArray, name: str) -> None:
    """Every entry in [0, 1] (this also rules out NaN and inf)."""
    if arr.ndim == 1 and arr.shape[0] <= 256:
        # Small 1-D: plain Python beats numpy's reductions several times over. A NaN or
        # inf anywhere makes the sum non-finite; after that min/max are reliable.
        vals = arr.tolist()
        if math.isfinite(sum(vals)) and min(vals) >= 0.0 and max(vals) <= 1.0:
            return
        raise _diagnose(arr, name, 0.0, 1.0)
    _check_range(arr, name, 0.0, 1.0)


def _scalar(x: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        raise _bad(f"{name} must be a number")
    v = float(x)
    if math.isnan(v):
        raise _bad(f"{name} is NaN")
    if math.isinf(v):
        raise _bad(f"{name} is inf")
    if positive and v <= 0:
        raise _bad(f"{name} must be > 0")
    if v < 0:
        raise _bad(f"{name} must be >= 0")
    return v


def _refusal_index(refusal: Any, m: int) -> int:
    if isinstance(refusal, bool) or not isinstance(refusal, int | np.integer):
        raise _bad("refusal must be an integer index")
    s = int(refusal)
    if not 0 <= s < m:
        raise _bad(f"refusal index {s} is out of range for {m} candidates")
    return s


# --------------------------------------------------------------------------- margins


@dataclass(frozen=True)
class Margins:
    """Margins relative to the refusal: ``M`` (m,), ``Delta`` (m,) or (k, m) for k budgets.

    ``M[refusal] == 0`` and ``Delta[..., refusal] == 0``. The arrays are read-only.
    """

    M: FloatArray
    Delta: FloatArray
    refusal: int = 0

    def __post_init__(self) -> None:
        # Copies: the frozen result must not share (or lock) the caller's arrays.
        M = _float_array(self.M, "M").copy()
        D = _float_array(self.Delta, "Delta").copy()
        if M.ndim != 1:
            raise _bad(f"M must be 1-D (got shape {M.shape})")
        if D.ndim not in (1, 2) or D.shape[-1] != M.shape[0]:
            raise _bad(f"Delta must have shape ({M.shape[0]},) or (k, {M.shape[0]}), got {D.shape}")
        s = _refusal_index(self.refusal, M.shape[0])
        _check_range(M, "M", -1.0, 1.0)
        _check_range(D, "Delta", -1.0, 1.0)
        if M[s] != 0.0 or np.any(D[..., s] != 0.0):
            raise _bad("M and Delta must be 0 at the refusal (margins are relative to refusing)")
        M.flags.writeable = False
        D.flags.writeable = False
        object.__setattr__(self, "M", M)
        object.__setattr__(self, "Delta", D)
        object.__setattr__(self, "refusal", s)

    @classmethod
    def _trusted(cls, M: FloatArray, D: FloatArray, s: int) -> Margins:
        # Built by `margins()` from checked scores: skip the second round of checks.
        self = object.__new__(cls)
        M.flags.writeable = False
        D.flags.writeable = False
        object.__setattr__(self, "M", M)
        object.__setattr__(self, "Delta", D)
        object.__setattr__(self, "refusal", s)
        return self

    @property
    def n_candidates(self) -> int:
        return int(self.M.shape[0])

    @property
    def n_budgets(self) -> int:
        return 1 if self.Delta.ndim == 1 else int(self.Delta.shape[0])

    @property
    def Delta2d(self) -> FloatArray:
        """``Delta`` as a (k, m) array (k = 1 for a single budget)."""
        return self.Delta if self.Delta.ndim == 2 else self.Delta[None, :]


def margins(helpfulness: ArrayLike, harm: ArrayLike, refusal: int = 0) -> Margins:
    """Margins over refusing from probability scores.

    ``helpfulness`` is (m,); ``harm`` is (m,) or (k, m) (one row per rule category).
    Every score must be in [0, 1]; bad input raises :class:`ConfigError` naming the field.
    """
    h = _float_array(helpfulness, "helpfulness")
    d = _float_array(harm, "harm")
    if h.ndim != 1:
        raise _bad(f"helpfulness must be 1-D (got shape {h.shape})")
    m = h.shape[0]
    if d.ndim not in (1, 2) or d.shape[-1] != m:
        raise _bad(f"harm must have shape ({m},) or (k, {m}) to match helpfulness, got {d.shape}")
    s = _refusal_index(refusal, m)
    _check_unit(h, "helpfulness")
    _check_unit(d, "harm")
    M = h - h[s]
    D = d - d[..., s : s + 1] if d.ndim == 2 else d - d[s]
    return Margins._trusted(M, D, s)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class GameResult:
    """The answer of every solver, with a fixed shape.

    ``value`` is always pi.M, the helpfulness gained over refusing. ``objective`` is what
    the solver maximised, on the same M scale and *without* the 1/(beta+1) factor: pi.M
    for hard budgets, pi.M - beta*L*max(0, r - T) for the hinge, pi.M - beta*L*tau*
    softplus((r - T)/tau) for the soft cap. ``expected_risk`` (k,) is pi.Delta per budget
    (nominal scores), ``budget`` (k,) the budgets used, ``multiplier`` (k,) the shadow price
    of each budget (d objective / d T, >= 0). Check ``status`` (or ``success``) first.
    """

    strategy: FloatArray
    value: float
    objective: float
    expected_risk: FloatArray
    budget: FloatArray
    multiplier: FloatArray
    status: Status
    message: str
    solver: str
    margins: Margins

    @property
    def success(self) -> bool:
        return self.status == Status.OPTIMAL

    @property
    def support(self) -> tuple[int, ...]:
        """Indices with non-zero probability."""
        return tuple(int(i) for i in np.flatnonzero(self.strategy > 0.0))

    @property
    def refuses(self) -> bool:
        """True when the strategy is the pure refusal (nothing beats refusing)."""
        return self.support == (self.margins.refusal,)


@dataclass(frozen=True)
class BatchResult:
    """:func:`solve_batch` output: one row per prompt (same meaning as :class:`GameResult`)."""

    strategy: FloatArray  # (n, m)
    value: FloatArray  # (n,)
    expected_risk: FloatArray  # (n,)
    multiplier: FloatArray  # (n,)
    budget: FloatArray  # (n,)
    status: NDArray[np.int8]  # (n,), Status codes

    @property
    def success(self) -> NDArray[np.bool_]:
        return np.asarray(self.status == Status.OPTIMAL)


def _describe(support: list[int], s: int) -> str:
    if support == [s]:
        return "optimal: refuse (no candidate beats refusing within the budget)"
    if len(support) == 1:
        return f"optimal: candidate {support[0]}"
    return "optimal: mix of candidates " + ", ".join(str(i) for i in support)


def _failed(
    mg: Margins, budgets: FloatArray, status: Status, message: str, solver: str
) -> GameResult:
    # Fail closed: a failed solve never turns into a silent allow.
    strategy = np.zeros(mg.n_candidates)
    strategy[mg.refusal] = 1.0
    k = mg.n_budgets
    return GameResult(
        strategy=strategy,
        value=0.0,
        objective=0.0,
        expected_risk=np.zeros(k),
        budget=budgets,
        multiplier=np.zeros(k),
        status=status,
        message=message,
        solver=solver,
        margins=mg,
    )


def _recheck_failure(solver: str, problems: list[str]) -> str:
    return f"{solver}: solution failed the re-check ({'; '.join(problems)}); refusing"


# Objective on the M scale from (value, risk as constrained), for the penalised games.
ObjectiveFn = Callable[[float, float], float]


def _finish_sparse(
    mg: Margins,
    weights: list[tuple[int, float]],
    budgets: FloatArray,
    multiplier: float,
    solver: str,
    Dw: list[float],
    Ml: list[float],
    cap: float | None,
    objective_fn: ObjectiveFn | None = None,
) -> GameResult:
    """Result of a one-budget exact solver (<= 2 weights), re-checked in plain Python.

    ``Dw`` are the risks as constrained (shifted by 2*epsilon); ``cap`` bounds their mix
    (None for the penalised games, which may exceed T on purpose).
    """
    total = value = worst = 0.0
    low = math.inf
    for i, w in weights:
        total += w
        value += w * Ml[i]
        worst += w * Dw[i]
        low = min(low, w)
    problems = []
    if not math.isfinite(total + value + worst):
        problems.append("strategy is not finite")
    else:
        if low < -FEAS_TOL:
            problems.append(f"negative weight {low:.3g}")
        if abs(total - 1.0) > FEAS_TOL:
            problems.append(f"weights sum to {total:.12g}")
        if cap is not None and worst > cap + FEAS_TOL:
            problems.append("expected risk exceeds the budget")
    if problems:
        return _failed(mg, budgets, Status.NUMERICAL, _recheck_failure(solver, problems), solver)
    strategy = np.zeros(len(Ml))
    Dn = mg.Delta2d[0]
    risk = 0.0
    for i, w in weights:
        strategy[i] += max(w, 0.0)
        risk += w * float(Dn[i])
    support = sorted({i for i, w in weights if w > 0.0})
    return GameResult(
        strategy=strategy,
        value=value,
        objective=value if objective_fn is None else objective_fn(value, worst),
        expected_risk=np.array([risk]),
        budget=budgets,
        multiplier=np.array([multiplier]),
        status=Status.OPTIMAL,
        message=_describe(support, mg.refusal),
        solver=solver,
        margins=mg,
    )


def _finish_dense(
    mg: Margins,
    x: FloatArray,
    budgets: FloatArray,
    multiplier: FloatArray,
    solver: str,
    Dw: FloatArray,
    check_budget: bool,
    objective_fn: ObjectiveFn | None = None,
) -> GameResult:
    """Result of a HiGHS solve, re-checked against the original constraints (``Dw`` (k, m))."""
    problems = []
    if x.shape != (mg.n_candidates,) or not np.isfinite(x).all():
        problems.append("strategy is not finite")
    else:
        if x.min() < -FEAS_TOL:
            problems.append(f"negative weight {x.min():.3g}")
        if abs(float(x.sum()) - 1.0) > FEAS_TOL:
            problems.append(f"weights sum to {float(x.sum()):.12g}")
        if check_budget and np.any(Dw @ x > budgets + FEAS_TOL):
            problems.append("expected risk exceeds the budget")
    if problems:
        return _failed(mg, budgets, Status.NUMERICAL, _recheck_failure(solver, problems), solver)
    # Drop solver dust (w < 1e-9, HiGHS's own tolerance scale) so the support is real.
    x = np.where(x < FEAS_TOL, 0.0, x)
    x /= x.sum()
    value = float(mg.M @ x)
    worst = float((Dw @ x)[0])
    return GameResult(
        strategy=x,
        value=value,
        objective=value if objective_fn is None else objective_fn(value, worst),
        expected_risk=mg.Delta2d @ x,
        budget=budgets,
        multiplier=multiplier,
        status=Status.OPTIMAL,
        message=_describe([int(i) for i in np.flatnonzero(x)], mg.refusal),
        solver=solver,
        margins=mg,
    )


# --------------------------------------------------------------------------- hull

Weights = list[tuple[int, float]]  # a sparse strategy: (candidate index, probability)


def _upper_hull(D: list[float], M: list[float], s: int) -> list[int]:
    """Vertices of the rising part of the upper concave hull of the points (D_i, M_i).

    Listed by increasing D, from the least risky point to the most helpful one (the peak).
    Points past the peak never matter: they lose helpfulness and add risk. Among points with
    equal D only the best is kept (highest M, then the refusal, then the lowest index);
    points on a hull edge (collinear) are not vertices.
    """
    # Pass 1, the Pareto staircase: by increasing risk, keep only points that are strictly
    # more helpful than everything less risky. A stable sort by D (C-level key); ties in D
    # are settled here. This usually leaves a handful of points.
    stair: list[int] = []
    top = -math.inf
    for i in sorted(range(len(D)), key=D.__getitem__):
        mi = M[i]
        if mi > top:
            if stair and D[stair[-1]] == D[i]:
                stair.pop()  # the better point at this risk replaces it
            stair.append(i)
            top = mi
        elif mi == top and i == s and D[stair[-1]] == D[i]:
            stair[-1] = i  # same scores as a candidate: prefer the refusal
    # Pass 2, monotone chain over the staircase (already sorted, M increasing).
    hull: list[int] = []
    for i in stair:
        di, mi = D[i], M[i]
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            da, ma = D[a], M[a]
            # Drop b when it lies on or below the segment from a to the new point.
            if (M[b] - ma) * (di - da) <= (mi - ma) * (D[b] - da):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _slope(D: list[float], M: list[float], a: int, b: int) -> float:
    return (M[b] - M[a]) / (D[b] - D[a])


def _hard_exact(D: list[float], M: list[float], s: int, T: float) -> tuple[Weights, float]:
    """Optimal strategy and multiplier of the one-budget LP, read off the hull."""
    hull = _upper_hull(D, M, s)
    peak = hull[-1]
    if D[peak] <= T:
        return [(peak, 1.0)], 0.0
    # Up to the peak the hull rises; its leftmost vertex has D <= D_s = 0 <= T.
    k = 0
    while D[hull[k + 1]] <= T:
        k += 1
    a, b = hull[k], hull[k + 1]
    # Right derivative of the value in T: the worth of one more unit of budget.
    mult = max(_slope(D, M, a, b), 0.0)
    if D[a] == T:
        return [(a, 1.0)], mult
    w = (T - D[a]) / (D[b] - D[a])
    return [(a, 1.0 - w), (b, w)], mult


def _on_hull(D: list[float], hull: list[int], r: float) -> tuple[int, int, float]:
    """The hull edge (a, b) holding risk r and the weight of b (0 when r is vertex a)."""
    for k in range(len(hull) - 1):
        a, b = hull[k], hull[k + 1]
        if D[a] <= r < D[b]:
            return a, b, (r - D[a]) / (D[b] - D[a])
    return hull[-1], hull[-1], 0.0


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _penalty(r: float, T: float, c: float, tau: float | None) -> float:
    """c*max(0, r - T) (hinge) or c*tau*softplus((r - T)/tau) (soft cap)."""
    if tau is None:
        return c * max(0.0, r - T)
    return c * tau * _softplus((r - T) / tau)


def _penalised_exact(
    D: list[float], M: list[float], s: int, T: float, c: float, tau: float | None
) -> tuple[Weights, float]:
    """Max over risk r of U(r) - penalty(r), U the upper hull: hinge or soft cap.

    U is concave and the penalty convex, so the maximum sits at a hull vertex, at r = T
    (the hinge's kink) or, for the soft cap, at a stationary point inside a hull edge.
    Candidates are scanned by increasing risk and replaced only on a strict improvement,
    so ties go to the lower risk.
    """
    hull = _upper_hull(D, M, s)
    points = [D[i] for i in hull]
    if tau is None:
        if D[hull[0]] < T < D[hull[-1]]:
            points.append(T)
    else:
        for k in range(len(hull) - 1):
            a, b = hull[k], hull[k + 1]
            sl = _slope(D, M, a, b)
            if 0.0 < sl < c:  # else the objective is monotone on this edge
                r = T + tau * math.log(sl / (c - sl))  # sigmoid((r - T)/tau) = slope / c
                if D[a] < r < D[b]:
                    points.append(r)
    points.sort()
    best_r, best_obj = points[0], -math.inf
    for r in points:
        a, b, w = _on_hull(D, hull, r)
        obj = M[a] + w * (M[b] - M[a]) - _penalty(r, T, c, tau)
        if obj > best_obj:
            best_r, best_obj = r, obj
    a, b, w = _on_hull(D, hull, best_r)
    weights = [(a, 1.0)] if w == 0.0 else [(a, 1.0 - w), (b, w)]
    # The multiplier: d objective / d T at the optimum (envelope theorem).
    if tau is not None:
        mult = c * _sigmoid((best_r - T) / tau)
    elif best_r > T:
        mult = c
    elif best_r < T:
        mult = 0.0
    else:
        ra, rb, _ = _on_hull(D, hull, T)
        right = _slope(D, M, ra, rb) if ra != rb else 0.0
        mult = min(max(right, 0.0), c)
    return weights, mult


# --------------------------------------------------------------------------- HiGHS


def _highs(
    c: FloatArray, A_ub: FloatArray, b_ub: FloatArray, A_eq: FloatArray, b_eq: FloatArray
) -> Any:
    from scipy.optimize import linprog

    return linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")


def _highs_status(res: Any) -> tuple[Status, str]:
    code = int(res.status)
    status = Status(code) if code in (0, 1, 2, 3, 4) else Status.NUMERICAL
    return status, f"highs: {res.message}"


# --------------------------------------------------------------------------- solve


def _budgets(budget: Any, k: int) -> FloatArray:
    if k == 1 and not isinstance(budget, list | tuple | np.ndarray):
        return np.array([_scalar(budget, "budget")])
    T = _float_array(budget, "budget").reshape(-1)
    if T.shape[0] == 1 and k > 1:
        T = np.repeat(T, k)
    if T.shape[0] != k:
        raise _bad(f"budget has {T.shape[0]} entries but harm has {k} rows")
    for i, v in enumerate(T.tolist()):
        _scalar(v, "budget" if k == 1 else f"budget[{i}]")
    return T


def solve(
    margins: Margins,
    budget: float | ArrayLike,
    *,
    method: Method = "auto",
    beta: float | None = None,
    penalty: float = 1.0,
    temperature: float | None = None,
    epsilon: float = 0.0,
) -> GameResult:
    """Solve the Safety Game for one prompt.

    - ``beta=None``: hard budget(s), the LP. One budget: the exact hull solver
      (``"exact"``; also what ``"auto"`` picks) or HiGHS (``"highs"``). Several budgets
      (``Delta`` is (k, m)): HiGHS, then a second LP that picks the least total risk among
      the optima (``"auto"`` or ``"highs"``).
    - finite ``beta`` with the adversary's multiplier bounded by ``penalty`` L: maximise
      pi.M - beta*L*max(0, pi.Delta - T), the game's max-min times (beta + 1), exactly
      (hull) or by HiGHS; with ``temperature`` tau > 0 the hinge becomes the soft cap
      beta*L*tau*softplus((pi.Delta - T)/tau) (exact solver only).
    - ``epsilon``: scores may be off by up to epsilon; every candidate but the refusal is
      charged Delta_i + 2*epsilon, so the true expected extra risk stays within T.

    Bad input raises :class:`ConfigError` (a ``ValueError``) naming the field. Solver
    trouble is a status on the result (``success`` False, refusal strategy), never silent.
    """
    if not isinstance(margins, Margins):
        raise _bad("margins must be a Margins (build it with safetygame.game.margins)")
    if method not in ("auto", "exact", "highs"):
        raise _bad(f"method must be 'auto', 'exact' or 'highs' (got {method!r})")
    k = margins.n_budgets
    T = _budgets(budget, k)
    shift = 0.0 if epsilon == 0.0 else 2.0 * _scalar(epsilon, "epsilon")
    if beta is not None:
        c = _scalar(beta, "beta") * _scalar(penalty, "penalty")
        tau = None if temperature is None else _scalar(temperature, "temperature", positive=True)
        if k != 1:
            raise _bad("beta (finite-beta game) supports one budget only")
        if tau is not None and method == "highs":
            raise _bad("temperature (soft cap) is not an LP: use method 'exact' or 'auto'")
        return _solve_penalised(margins, T, c, tau, method, shift)
    if temperature is not None:
        raise _bad("temperature needs a finite beta")
    if k == 1 and method != "highs":
        s = margins.refusal
        Ml = margins.M.tolist()
        Dw = margins.Delta2d[0].tolist()
        if shift:
            Dw = [v + shift if i != s else 0.0 for i, v in enumerate(Dw)]
        Tf = float(T[0])
        weights, mult = _hard_exact(Dw, Ml, s, Tf)
        return _finish_sparse(margins, weights, T, mult, "exact-hull", Dw, Ml, Tf)
    if method == "exact":
        raise _bad("method 'exact' supports one budget; use 'highs' or 'auto' for several")
    return _solve_lp_highs(margins, T, shift)


def _shifted(mg: Margins, shift: float) -> FloatArray:
    """Risks as constrained: (k, m), every candidate but the refusal plus 2*epsilon."""
    D = mg.Delta2d
    if shift == 0.0:
        return D
    D = D + shift
    D[:, mg.refusal] = 0.0
    return D


def _solve_lp_highs(mg: Margins, T: FloatArray, shift: float) -> GameResult:
    m = mg.n_candidates
    D = _shifted(mg, shift)
    ones = np.ones((1, m))
    res = _highs(-mg.M, D, T, ones, np.ones(1))
    status, msg = _highs_status(res)
    if status != Status.OPTIMAL:
        return _failed(mg, T, status, msg, "highs")
    x = np.asarray(res.x, dtype=np.float64)
    mult = np.maximum(-np.asarray(res.ineqlin.marginals, dtype=np.float64), 0.0)
    solver = "highs"
    if D.shape[0] > 1:
        # Tie-break among the optima: least total expected risk (a second LP), kept only
        # if it gives up no value beyond round-off.
        v = float(mg.M @ x)
        tol = 1e-12 * max(1.0, abs(v))
        A2 = np.vstack([D, -mg.M[None, :]])
        res2 = _highs(D.sum(axis=0), A2, np.append(T, -(v - tol)), ones, np.ones(1))
        if int(res2.status) == 0:
            x2 = np.asarray(res2.x, dtype=np.float64)
            if float(mg.M @ x2) >= v - 1e-10:
                x, solver = x2, "highs+tiebreak"
    return _finish_dense(mg, x, T, mult, solver, D, True)


def _solve_penalised(
    mg: Margins, T: FloatArray, c: float, tau: float | None, method: Method, shift: float
) -> GameResult:
    Tf = float(T[0])

    def objective(value: float, risk: float) -> float:
        return value - _penalty(risk, Tf, c, tau)

    if method == "highs":
        m = mg.n_candidates
        D = _shifted(mg, shift)
        # Variables (pi, z): max pi.M - c z  s.t.  pi.Delta - z <= T, sum pi = 1, z >= 0.
        res = _highs(
            np.append(-mg.M, c),
            np.append(D[0], -1.0)[None, :],
            T,
            np.append(np.ones(m), 0.0)[None, :],
            np.ones(1),
        )
        status, msg = _highs_status(res)
        if status != Status.OPTIMAL:
            return _failed(mg, T, status, msg, "highs-hinge")
        x = np.asarray(res.x[:m], dtype=np.float64)
        price = np.array([max(-float(res.ineqlin.marginals[0]), 0.0)])
        return _finish_dense(mg, x, T, price, "highs-hinge", D, False, objective)
    s = mg.refusal
    Ml = mg.M.tolist()
    Dw = _shifted(mg, shift)[0].tolist()
    weights, mult = _penalised_exact(Dw, Ml, s, Tf, c, tau)
    name = "exact-hinge" if tau is None else "exact-soft"
    return _finish_sparse(mg, weights, T, mult, name, Dw, Ml, None, objective)


# --------------------------------------------------------------------------- batch


def _batch_margins(
    M: ArrayLike, Delta: ArrayLike, mask: ArrayLike | None, refusal: int
) -> tuple[FloatArray, FloatArray, NDArray[np.bool_], int]:
    """Checked (n, m) margins of a batch, masked-out entries zeroed, the valid mask, and s."""
    Ma = _float_array(M, "M")
    Da = _float_array(Delta, "Delta")
    if Ma.ndim != 2:
        raise _bad(f"M must be 2-D (n_prompts, m), got shape {Ma.shape}")
    if Da.shape != Ma.shape:
        raise _bad(f"Delta must have the shape of M {Ma.shape}, got {Da.shape}")
    n, m = Ma.shape
    s = _refusal_index(refusal, m)
    if mask is None:
        valid = np.ones((n, m), dtype=bool)
    else:
        valid = np.asarray(mask)
        if valid.shape != Ma.shape:
            raise _bad(f"mask must have the shape of M {Ma.shape}, got {valid.shape}")
        if valid.dtype != np.bool_:
            raise _bad("mask must be boolean")
        if not valid[:, s].all():
            raise _bad(f"mask[{int(np.argmin(valid[:, s]))}, {s}] hides the refusal")
        Ma = np.where(valid, Ma, 0.0)
        Da = np.where(valid, Da, 0.0)
    _check_range(Ma, "M", -1.0, 1.0)
    _check_range(Da, "Delta", -1.0, 1.0)
    if np.any(Ma[:, s] != 0.0) or np.any(Da[:, s] != 0.0):
        raise _bad("M and Delta must be 0 in the refusal column")
    return Ma, Da, valid, s


def solve_batch(
    M: ArrayLike,
    Delta: ArrayLike,
    budget: float | ArrayLike,
    mask: ArrayLike | None = None,
    *,
    refusal: int = 0,
    epsilon: float = 0.0,
) -> BatchResult:
    """The one-budget hard game for n prompts at once, vectorised.

    ``M`` and ``Delta`` are (n, m) margins; ``mask`` (n, m) marks the valid candidates of
    each prompt (masked-out entries are ignored and may hold anything, NaN included; the
    refusal column must be valid). ``budget`` is a scalar or (n,). Same results and
    tie-breaking as :func:`solve` with ``method="exact"``.
    """
    Ma, Da, valid, s = _batch_margins(M, Delta, mask, refusal)
    n, m = Ma.shape
    if isinstance(budget, int | float | np.integer | np.floating):
        T = np.full(n, _scalar(budget, "budget"))
    else:
        T = _float_array(budget, "budget").reshape(-1)
        if T.shape[0] != n:
            raise _bad(f"budget must be a scalar or have {n} entries, got {T.shape[0]}")
        _check_range(T, "budget", 0.0, math.inf)
    eps = _scalar(epsilon, "epsilon")
    Dw = Da
    if eps > 0.0:
        Dw = Da + 2.0 * eps
        Dw[:, s] = 0.0

    # Each prompt's answer is (i, j, w): weight 1 - w on i and w on j (j == i, w == 0 for one).
    bi = np.zeros(n, dtype=np.intp)
    bj = np.zeros(n, dtype=np.intp)
    bw = np.zeros(n)
    mult = np.zeros(n)
    # Chunks keep the per-pair temporaries in cache while amortising numpy's call overhead.
    step = 8192
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        _batch_chunk(Ma[sl], Dw[sl], T[sl], valid[sl], s, bi[sl], bj[sl], bw[sl], mult[sl])

    rows = np.arange(n)
    wi = 1.0 - bw
    value = Ma[rows, bi] * wi + Ma[rows, bj] * bw
    risk = Da[rows, bi] * wi + Da[rows, bj] * bw
    worst = risk if Dw is Da else Dw[rows, bi] * wi + Dw[rows, bj] * bw
    # The re-check (scipy's _check_result), O(n) because each answer has <= 2 entries.
    ok = (bw >= 0.0) & (bw <= 1.0) & (worst <= T + FEAS_TOL) & valid[rows, bi] & valid[rows, bj]
    if not ok.all():
        bad = ~ok  # fail closed to the refusal
        bi[bad] = bj[bad] = s
        bw[bad] = value[bad] = risk[bad] = mult[bad] = 0.0
        wi[bad] = 1.0
    strategy = np.zeros((n, m))
    strategy[rows, bi] = wi
    strategy[rows, bj] += bw
    status = np.where(ok, Status.OPTIMAL, Status.NUMERICAL).astype(np.int8)
    return BatchResult(strategy, value, risk, mult, T, status)


def _batch_chunk(
    M: FloatArray,
    D: FloatArray,
    T: FloatArray,
    valid: NDArray[np.bool_],
    s: int,
    bi: NDArray[np.intp],
    bj: NDArray[np.intp],
    bw: FloatArray,
    mult: FloatArray,
) -> None:
    n, m = M.shape
    # Candidate-major copies: every operation below runs on contiguous length-n rows,
    # several times faster in numpy than reductions along a short last axis.
    all_valid = bool(valid.all())
    Mt = np.ascontiguousarray(M.T)
    Dt = np.ascontiguousarray(D.T) if all_valid else np.where(valid.T, D.T, np.nan)
    left = Dt <= T  # NaN (masked) compares False

    # Best single candidate within budget: max M, then least risk, then refusal, then index.
    Ms = np.where(left, Mt, -np.inf)
    vs = Ms.max(axis=0)
    tie = Ms == vs
    Dtie = np.where(tie, Dt, np.inf)
    tie &= Dtie == Dtie.min(axis=0)
    single = np.full(n, s, dtype=np.intp)
    for i in range(m - 1, -1, -1):
        single = np.where(tie[i] & ~tie[s], i, single)

    # Best pair mixed at risk exactly T. For i < j the mix puts weight w on j with
    # w = (T - D_i) / (D_j - D_i); it is a valid mixture iff T lies between the two risks
    # (in either order): exactly one of them within budget. So each unordered pair is
    # visited once. A masked candidate has NaN risk, so its pair value is NaN and never wins.
    best = np.full(n, -np.inf)
    bp = np.zeros(n, dtype=np.intp)
    slack = T - Dt
    dd = np.empty(n)
    pv = np.empty(n)
    ok = np.empty(n, dtype=bool)
    pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, (a, b) in enumerate(pairs):
            np.subtract(Dt[b], Dt[a], out=dd)
            np.divide(slack[a], dd, out=dd)  # w
            np.subtract(Mt[b], Mt[a], out=pv)
            pv *= dd
            pv += Mt[a]
            np.not_equal(left[a], left[b], out=ok)
            ok &= pv > best
            np.copyto(best, pv, where=ok)
            np.copyto(bp, p, where=ok)
    pi = np.array([a for a, _ in pairs] or [0], dtype=np.intp)[bp]
    pj = np.array([b for _, b in pairs] or [0], dtype=np.intp)[bp]

    use_pair = best > vs
    ci = np.where(use_pair, pi, single)
    cj = np.where(use_pair, pj, single)
    rows = np.arange(n)
    di, dj = D[rows, ci], D[rows, cj]
    mi, mj = M[rows, ci], M[rows, cj]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(use_pair, (T - di) / (dj - di), 0.0)
        slope = np.where(use_pair, (mj - mi) / (dj - di), 0.0)
    bi[:] = ci
    bj[:] = cj
    bw[:] = w
    mult[:] = np.maximum(slope, 0.0)

    # A single candidate exactly at the budget: right derivative = best slope to its right.
    at = rows[~use_pair & (di == T)]
    if at.size:
        ai = single[at]
        da = D[at] - D[at, ai][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            sl = (M[at] - M[at, ai][:, None]) / da
        sl = np.where(valid[at] & (da > 0.0), sl, -np.inf).max(axis=1)
        mult[at] = np.maximum(sl, 0.0)


# --------------------------------------------------------------------------- pooled budget


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


# --------------------------------------------------------------------------- choose


def choose(
    result: GameResult,
    mode: Literal["sample", "argmax"] = "sample",
    rng: int | np.random.Generator | None = None,
) -> int:
    """Pick the candidate to answer with.

    ``"sample"`` draws from the strategy with a ``numpy.random.Generator`` (an int seeds a
    fresh one). ``"argmax"`` takes the heaviest weight; ties go to the lower total expected
    risk, then the refusal, then the lower index.
    """
    p = np.maximum(result.strategy, 0.0)
    if mode == "argmax":
        top = np.flatnonzero(p >= p.max() - 1e-12)
        risk = result.margins.Delta2d.sum(axis=0)
        s = result.margins.refusal
        return int(min(top.tolist(), key=lambda i: (risk[i], i != s, i)))
    if mode != "sample":
        raise _bad(f"mode must be 'sample' or 'argmax' (got {mode!r})")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    c = np.cumsum(p)
    u = gen.random() * c[-1]
    # side="right": zero-weight entries (flat cumsum) can never be drawn.
    return int(min(np.searchsorted(c, u, side="right"), len(p) - 1))
