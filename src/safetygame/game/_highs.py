"""The HiGHS reference solver (``scipy.optimize.linprog``): several budgets, and a check
on the exact solvers."""

from __future__ import annotations

from typing import Any

import numpy as np

from safetygame.game._core import GameResult, Margins, Status, _failed, _finish_dense, _shifted
from safetygame.game._validation import FloatArray


def _highs(
    c: FloatArray, A_ub: FloatArray, b_ub: FloatArray, A_eq: FloatArray, b_eq: FloatArray
) -> Any:
    from scipy.optimize import linprog

    return linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")


def _highs_status(res: Any) -> tuple[Status, str]:
    code = int(res.status)
    status = Status(code) if code in (0, 1, 2, 3, 4) else Status.NUMERICAL
    return status, f"highs: {res.message}"


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
