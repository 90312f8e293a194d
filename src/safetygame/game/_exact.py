"""The exact solvers of the one-budget game: read off the upper concave hull.

Pure Python over lists (a few candidates per prompt: faster than numpy at this size).
"""

from __future__ import annotations

import math

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
