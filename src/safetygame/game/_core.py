"""Margins, the result type every one-prompt solver returns, and its re-check.

Every solver's answer goes through :func:`_finish_sparse` (exact solvers) or
:func:`_finish_dense` (HiGHS): the strategy is re-checked against the constraints as
given (scipy's ``_check_result``) and a failure turns into a refusal with status
``NUMERICAL``, never a silent allow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numpy.typing import ArrayLike

from safetygame.game._validation import (
    FloatArray,
    _bad,
    _check_range,
    _check_unit,
    _float_array,
    _refusal_index,
)

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


def _shifted(mg: Margins, shift: float) -> FloatArray:
    """Risks as constrained: (k, m), every candidate but the refusal plus 2*epsilon."""
    D = mg.Delta2d
    if shift == 0.0:
        return D
    D = D + shift
    D[:, mg.refusal] = 0.0
    return D
