"""The one-budget hard game for many prompts at once, vectorised over prompts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from safetygame.game._core import FEAS_TOL, Status
from safetygame.game._validation import (
    FloatArray,
    _bad,
    _batch_margins,
    _check_range,
    _float_array,
    _scalar,
)


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
