"""Solver benchmark: the exact hull solver against HiGHS, and the batched solver's throughput.

Everything runs on seeded random instances (uniform probability scores, refusal at index 0)
so two runs measure the same problems. Numbers are wall-clock on whatever machine runs it.
"""

from __future__ import annotations

import os
import statistics
import time
from functools import partial
from typing import Any

import numpy as np

from safetygame.game import margins, solve, solve_batch

SIZES = (4, 8, 16, 64)
TARGETS = {
    "speedup_vs_highs": 50.0,
    "batched_prompts_per_s": 1_000_000.0,
    "max_abs_value_diff": 1e-9,
}


def _instances(rng: np.random.Generator, n: int, m: int) -> tuple[Any, Any, Any]:
    h = rng.random((n, m))
    d = rng.random((n, m))
    T = rng.uniform(0.0, 0.4, n)
    return h, d, T


def _time_us(fn: Any, repeats: int) -> float:
    """Best of ``repeats`` single calls, in microseconds (the best damps scheduler noise)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def run_solver_bench(
    instances: int = 200,
    batch_prompts: int = 100_000,
    sizes: tuple[int, ...] = SIZES,
    batch_m: int = 8,
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Per-prompt exact vs HiGHS (median time, speed-up, value gap) and batched throughput.

    Per-prompt timings are taken twice, for both methods alike: the solver call itself,
    ``solve(mg, T)`` on margins built beforehand (``speedup_vs_highs``, the solver against
    the solver), and the public path from raw scores, ``solve(margins(h, d), T)`` with input
    validation (``speedup_vs_highs_incl_margins``). Each summary is the smallest per-size
    speed-up (the conservative one).
    """
    rng = np.random.default_rng(seed)
    # Warm-up: the first HiGHS call imports scipy.optimize.
    warm = margins([0.1, 0.5], [0.0, 0.3])
    solve(warm, 0.1)
    solve(warm, 0.1, method="highs")

    per_m: dict[str, Any] = {}
    for m in sizes:
        h, d, T = _instances(rng, instances, m)
        t_exact, t_highs, t_exact_full, t_highs_full, diffs = [], [], [], [], []
        for k in range(instances):
            hk, dk, tk = h[k], d[k], float(T[k])
            mg = margins(hk, dk)
            exact = partial(lambda g, t: solve(g, t), mg, tk)
            highs = partial(lambda g, t: solve(g, t, method="highs"), mg, tk)
            t_exact.append(_time_us(exact, repeats))
            t_highs.append(_time_us(highs, repeats))
            exact_full = partial(lambda a, b, t: solve(margins(a, b), t), hk, dk, tk)
            highs_full = partial(
                lambda a, b, t: solve(margins(a, b), t, method="highs"), hk, dk, tk
            )
            t_exact_full.append(_time_us(exact_full, repeats))
            t_highs_full.append(_time_us(highs_full, repeats))
            a, b = exact(), highs()
            diffs.append(abs(a.value - b.value))
        me, mh = statistics.median(t_exact), statistics.median(t_highs)
        mef, mhf = statistics.median(t_exact_full), statistics.median(t_highs_full)
        per_m[str(m)] = {
            "exact_median_us": me,
            "highs_median_us": mh,
            "speedup": mh / me,
            "exact_incl_margins_median_us": mef,
            "highs_incl_margins_median_us": mhf,
            "speedup_incl_margins": mhf / mef,
            "max_abs_value_diff": max(diffs),
        }

    h, d, T = _instances(rng, batch_prompts, batch_m)
    M, D = h - h[:, :1], d - d[:, :1]
    solve_batch(M[:1000], D[:1000], T[:1000])  # warm-up
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        solve_batch(M, D, T)
        runs.append(time.perf_counter() - t0)
    batched = batch_prompts / statistics.median(runs)

    result = {
        "speedup_vs_highs": min(v["speedup"] for v in per_m.values()),
        "speedup_vs_highs_incl_margins": min(v["speedup_incl_margins"] for v in per_m.values()),
        "batched_prompts_per_s": batched,
        "max_abs_value_diff": max(v["max_abs_value_diff"] for v in per_m.values()),
        "per_m": per_m,
        "batch": {
            "m": batch_m,
            "prompts": batch_prompts,
            "median_s": statistics.median(runs),
            "best_s": min(runs),
            "best_prompts_per_s": batch_prompts / min(runs),
        },
        "config": {
            "instances": instances,
            "seed": seed,
            "repeats": repeats,
            # Other processes skew timings; the load is recorded next to the numbers.
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "threads": "one core: the batched solver uses numpy element-wise ufuncs only, "
            "which are single-threaded (no BLAS calls)",
        },
        "targets": TARGETS,
    }
    result["meets_targets"] = {
        "speedup_vs_highs": result["speedup_vs_highs"] >= TARGETS["speedup_vs_highs"],
        "batched_prompts_per_s": batched >= TARGETS["batched_prompts_per_s"],
        "max_abs_value_diff": result["max_abs_value_diff"] <= TARGETS["max_abs_value_diff"],
    }
    return result
