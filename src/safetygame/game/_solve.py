"""The one-prompt entry points: :func:`solve` dispatches to a solver family; :func:`choose`."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from safetygame.game._core import (
    GameResult,
    Margins,
    Status,
    _failed,
    _finish_dense,
    _finish_sparse,
    _shifted,
)
from safetygame.game._exact import _hard_exact, _penalised_exact, _penalty
from safetygame.game._highs import _highs, _highs_status, _solve_lp_highs
from safetygame.game._validation import FloatArray, _bad, _budgets, _scalar

Method = Literal["auto", "exact", "highs"]


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
