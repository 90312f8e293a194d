"""Input checks of the solvers: every bad input is a ConfigError naming the field."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from safetygame.errors import ConfigError

FloatArray = NDArray[np.float64]


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
