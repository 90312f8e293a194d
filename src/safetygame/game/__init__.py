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

The package is split by solver family: ``_validation`` (input checks), ``_core``
(margins, results and the re-check), ``_exact`` (hull solvers), ``_highs`` (the HiGHS
reference), ``_solve`` (the one-prompt dispatcher and :func:`choose`), ``_batch``
(:func:`solve_batch`), ``_pooled`` (:func:`solve_pooled`) and ``_deploy`` (the adaptive
fast path :func:`fast_path` and :func:`reads_refusal_helpfulness`; the traffic price
:func:`calibrate_price`, :func:`best_response`).
"""

from __future__ import annotations

from safetygame.game._batch import BatchResult, solve_batch
from safetygame.game._core import FEAS_TOL as FEAS_TOL
from safetygame.game._core import GameResult, Margins, Status, margins
from safetygame.game._deploy import (
    PriceCalibration,
    best_response,
    calibrate_price,
    fast_path,
    reads_refusal_helpfulness,
)
from safetygame.game._pooled import PooledResult, solve_pooled
from safetygame.game._solve import Method as Method
from safetygame.game._solve import choose, solve
from safetygame.game._validation import FloatArray as FloatArray

__all__ = [
    "BatchResult",
    "GameResult",
    "Margins",
    "PooledResult",
    "PriceCalibration",
    "Status",
    "best_response",
    "calibrate_price",
    "choose",
    "fast_path",
    "margins",
    "reads_refusal_helpfulness",
    "solve",
    "solve_batch",
    "solve_pooled",
]
