"""Properties of the Safety Game solvers (safetygame.game), checked against HiGHS."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetygame.game import (
    GameResult,
    Margins,
    Status,
    best_response,
    calibrate_price,
    choose,
    fast_path,
    margins,
    reads_refusal_helpfulness,
    solve,
    solve_batch,
    solve_pooled,
)
from safetygame.game._core import _finish_sparse

TOL = 1e-9
prob = st.floats(0.0, 1.0, allow_subnormal=False)
# Probe scores on a 1e-4 grid, for comparisons with HiGHS: HiGHS drops matrix entries below
# 1e-9 and accepts violations up to 1e-7, so margins a hair apart (say Delta = 3e-49 at
# T = 0) are legitimately read differently by an exact solver and a tolerant one.
grid = st.integers(0, 10_000).map(lambda v: v / 10_000)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def games(
    draw: st.DrawFn, min_m: int = 1, max_m: int = 9, k: int = 0, on_grid: bool = False
) -> tuple[Margins, float]:
    """A random one-prompt game: scores in [0, 1], a refusal index and a budget."""
    score = grid if on_grid else prob
    m = draw(st.integers(min_m, max_m))
    h = draw(st.lists(score, min_size=m, max_size=m))
    shape = m if k == 0 else k * m
    d = draw(st.lists(score, min_size=shape, max_size=shape))
    s = draw(st.integers(0, m - 1))
    T = draw(score)
    harm = np.array(d) if k == 0 else np.array(d).reshape(k, m)
    return margins(h, harm, s), T


def assert_feasible(res: GameResult, budget: np.ndarray | float, tol: float = TOL) -> None:
    x = res.strategy
    assert res.success, res.message
    assert x.min() >= 0.0
    assert abs(x.sum() - 1.0) <= tol
    risk = res.margins.Delta2d @ x
    assert np.all(risk <= np.asarray(budget) + tol)
    assert np.allclose(risk, res.expected_risk, atol=1e-12)
    assert res.value == pytest.approx(float(res.margins.M @ x), abs=1e-12)


def rng_scores(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.random(m), rng.random(m)


# --------------------------------------------------------------------------- hard budget


@SETTINGS
@given(games(on_grid=True))
def test_exact_is_feasible_and_matches_highs(game: tuple[Margins, float]) -> None:
    mg, T = game
    exact = solve(mg, T, method="exact")
    highs = solve(mg, T, method="highs")
    assert_feasible(exact, T)
    assert_feasible(highs, T, tol=1e-7)
    assert exact.solver == "exact-hull" and highs.solver == "highs"
    assert abs(exact.value - highs.value) <= TOL


@SETTINGS
@given(games())
def test_one_budget_mixes_at_most_two(game: tuple[Margins, float]) -> None:
    mg, T = game
    res = solve(mg, T)
    assert 1 <= len(res.support) <= 2
    if len(res.support) == 2:
        # A genuine mix sits exactly on the budget.
        assert res.expected_risk[0] == pytest.approx(T, abs=1e-12)


@SETTINGS
@given(games(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_value_non_decreasing_in_budget(game: tuple[Margins, float], a: float, b: float) -> None:
    mg, _ = game
    lo, hi = sorted((a, b))
    assert solve(mg, lo).value <= solve(mg, hi).value + 1e-12


@SETTINGS
@given(st.data(), st.integers(1, 8))
def test_refusal_when_nothing_beats_it(data: st.DataObject, m: int) -> None:
    s = data.draw(st.integers(0, m - 1))
    hs = data.draw(prob)
    h = data.draw(st.lists(st.floats(0.0, hs), min_size=m, max_size=m))
    h[s] = hs
    d = data.draw(st.lists(prob, min_size=m, max_size=m))
    T = data.draw(prob)
    res = solve(margins(h, d, s), T)
    assert res.value == 0.0
    # Among the optimal strategies (value 0) the least risky wins, then the refusal.
    risk = np.array(d) - d[s]
    zero = [i for i in range(m) if h[i] == hs]
    best = min(zero, key=lambda i: (risk[i], i != s, i))
    assert res.support == (best,)
    if risk[best] == 0.0:
        assert res.refuses and res.status == Status.OPTIMAL
        assert "refuse" in res.message


@SETTINGS
@given(st.data(), st.integers(1, 8))
def test_zero_budget_all_riskier_gives_refusal(data: st.DataObject, m: int) -> None:
    s = data.draw(st.integers(0, m - 1))
    ds = data.draw(st.floats(0.0, 0.9))
    d = data.draw(st.lists(st.floats(ds + 1e-6, 1.0), min_size=m, max_size=m))
    d[s] = ds
    h = data.draw(st.lists(prob, min_size=m, max_size=m))
    for method in ("exact", "highs"):
        gap = min((d[i] - ds for i in range(m) if i != s), default=1.0)
        if method == "highs" and gap < 1e-3:
            continue  # below HiGHS's tolerances: only the exact solver can tell
        res = solve(margins(h, d, s), 0.0, method=method)
        assert res.refuses, (method, res)
        assert res.value == 0.0


def test_chemistry_style_example_mixes_two() -> None:
    # Refusal, then four answers of rising helpfulness and risk.
    mg = margins([0.05, 0.35, 0.6, 0.85, 0.95], [0.02, 0.04, 0.12, 0.35, 0.7], refusal=0)
    res = solve(mg, 0.2)
    assert res.support == (2, 3)
    # Weight on 3 puts the mix exactly on the budget: 0.10 + w * (0.33 - 0.10) = 0.2.
    w = (0.2 - 0.10) / (0.33 - 0.10)
    assert res.strategy[3] == pytest.approx(w)
    assert res.multiplier[0] == pytest.approx((0.80 - 0.55) / (0.33 - 0.10))


def test_multiplier_matches_highs_shadow_price() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        m = int(rng.integers(2, 12))
        mg = margins(*rng_scores(rng, m), refusal=int(rng.integers(m)))
        T = float(rng.random() * 0.5)
        a, b = solve(mg, T), solve(mg, T, method="highs")
        assert a.multiplier[0] == pytest.approx(b.multiplier[0], abs=1e-7)
        assert a.multiplier[0] >= 0.0


def test_exact_matches_highs_on_many_random_instances() -> None:
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(300):
        m = int(rng.choice([4, 8, 16, 64]))
        mg = margins(*rng_scores(rng, m))
        T = float(rng.random() * 0.4)
        worst = max(worst, abs(solve(mg, T).value - solve(mg, T, method="highs").value))
    assert worst <= TOL


# --------------------------------------------------------------------------- robust budget


@SETTINGS
@given(games(max_m=7), st.floats(0.0, 0.2), st.integers(0, 2**32 - 1))
def test_robust_budget_holds_under_perturbed_scores(
    game: tuple[Margins, float], eps: float, seed: int
) -> None:
    mg, T = game
    res = solve(mg, T, epsilon=eps)
    assert res.success
    x, s, m = res.strategy, mg.refusal, mg.n_candidates
    rng = np.random.default_rng(seed)
    # The true scores d* = d + e, |e_i| <= eps; Delta* = Delta + e - e_s.
    shifts = [rng.uniform(-eps, eps, m) for _ in range(50)]
    worst = np.full(m, eps)
    worst[s] = -eps  # the adversarial corner: every candidate worse, the refusal better
    shifts.append(worst)
    for e in shifts:
        true_delta = mg.Delta + e - e[s]
        assert float(true_delta @ x) <= T + TOL


def test_robust_budget_below_two_epsilon() -> None:
    # T < 2 eps with a candidate safer than the refusal: solving with max(T - 2 eps, 0)
    # would mix 1 and 2 at nominal risk 0, whose worst case is 0.2 > T. Ours holds.
    mg = margins([0.1, 0.6, 1.0], [0.2, 0.1, 0.3], refusal=0)
    T, eps = 0.05, 0.1
    res = solve(mg, T, epsilon=eps)
    e = np.array([-eps, eps, eps])
    assert float((mg.Delta + e - e[0]) @ res.strategy) <= T + TOL
    assert res.value > 0.0  # still better than refusing outright


def test_robust_equals_hard_with_shifted_budget_when_refusal_unused() -> None:
    # When the optimum puts no weight on the refusal, the robust game is the hard game
    # at budget T - 2 eps.
    mg = margins([0.0, 0.5, 0.9], [0.0, 0.1, 0.5], refusal=0)
    res = solve(mg, 0.3, epsilon=0.05)
    assert res.strategy[0] == 0.0
    assert res.value == pytest.approx(solve(mg, 0.2).value)


# --------------------------------------------------------------------------- batched


def _compressed(
    M: np.ndarray, D: np.ndarray, keep: np.ndarray, s: int
) -> tuple[Margins, list[int]]:
    idx = [int(i) for i in np.flatnonzero(keep)]
    return Margins(M[idx], D[idx], idx.index(s)), idx


def test_batch_equals_per_prompt_with_masks() -> None:
    rng = np.random.default_rng(3)
    n, m, s = 400, 8, 2
    h, d = rng.random((n, m)), rng.random((n, m))
    M, D = h - h[:, s : s + 1], d - d[:, s : s + 1]
    mask = rng.random((n, m)) < 0.7
    mask[:, s] = True
    M[~mask] = np.nan  # masked entries may hold anything
    T = rng.random(n) * 0.4
    out = solve_batch(M, D, T, mask, refusal=s)
    assert (out.status == 0).all()
    for r in range(n):
        mg, idx = _compressed(M[r], D[r], mask[r], s)
        one = solve(mg, float(T[r]))
        assert out.value[r] == pytest.approx(one.value, abs=1e-12)
        assert out.expected_risk[r] == pytest.approx(one.expected_risk[0], abs=1e-12)
        assert out.multiplier[r] == pytest.approx(one.multiplier[0], abs=1e-9)
        np.testing.assert_allclose(out.strategy[r, idx], one.strategy, atol=1e-12)
        assert out.strategy[r, ~mask[r]].sum() == 0.0


def _draw_batch(
    data: st.DataObject, n: int, m: int, score: st.SearchStrategy[float]
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """A refusal index, (n, m) helpfulness and harm scores, and a mask keeping the refusal."""
    s = data.draw(st.integers(0, m - 1))
    h = np.array(data.draw(st.lists(score, min_size=n * m, max_size=n * m))).reshape(n, m)
    d = np.array(data.draw(st.lists(score, min_size=n * m, max_size=n * m))).reshape(n, m)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m)))
    mask = mask.reshape(n, m)
    mask[:, s] = True
    return s, h, d, mask


@SETTINGS
@given(st.data(), st.integers(1, 6), st.integers(1, 6))
def test_batch_equals_per_prompt_hypothesis(data: st.DataObject, n: int, m: int) -> None:
    s, h, d, mask = _draw_batch(data, n, m, prob)
    T = np.array(data.draw(st.lists(prob, min_size=n, max_size=n)))
    eps = data.draw(st.sampled_from([0.0, 0.01]))
    M, D = h - h[:, s : s + 1], d - d[:, s : s + 1]
    out = solve_batch(M, D, T, mask, refusal=s, epsilon=eps)
    for r in range(n):
        mg, _ = _compressed(M[r], D[r], mask[r], s)
        one = solve(mg, float(T[r]), epsilon=eps)
        assert out.value[r] == pytest.approx(one.value, abs=1e-12)
        assert out.expected_risk[r] == pytest.approx(one.expected_risk[0], abs=1e-12)
        assert out.status[r] == Status.OPTIMAL


@SETTINGS
@given(st.data(), st.integers(1, 6), st.integers(1, 5))
def test_pooled_matches_the_joint_lp_and_binds_only_the_mean(
    data: st.DataObject, n: int, m: int
) -> None:
    from scipy.optimize import linprog

    s, h, d, mask = _draw_batch(data, n, m, grid)
    T = data.draw(grid)
    eps = data.draw(st.sampled_from([0.0, 0.01]))
    M, D = h - h[:, s : s + 1], d - d[:, s : s + 1]
    out = solve_pooled(M, D, T, mask, refusal=s, epsilon=eps)
    assert out.success, out.message
    x = out.strategy
    assert x.min() >= 0.0 and np.allclose(x.sum(axis=1), 1.0, atol=TOL)
    assert x[~mask].sum() == 0.0
    assert out.mean_risk <= T + TOL
    np.testing.assert_allclose((x * D).sum(axis=1), out.expected_risk, atol=1e-12)
    # At most one prompt mixes (one coupling row), and never more than two candidates.
    assert ((x > 0).sum(axis=1) > 1).sum() <= 1 and (x > 0).sum(axis=1).max() <= 2
    # The joint LP over all n prompts, solved by HiGHS; eps charges 2 eps off the refusal.
    Dw = D + 2 * eps
    Dw[:, s] = 0.0
    c = -np.where(mask, M, 0.0).ravel()
    eq = np.kron(np.eye(n), np.ones(m))
    bounds = [(0.0, None if k else 0.0) for k in mask.ravel()]
    lp = linprog(c, A_ub=[np.where(mask, Dw, 0.0).ravel()], b_ub=[n * T], A_eq=eq,
                 b_eq=np.ones(n), bounds=bounds, method="highs")  # fmt: skip
    assert lp.status == 0
    assert out.value.sum() == pytest.approx(-lp.fun, abs=1e-7)
    # Pooling never loses to per-prompt budgets (which are one feasible pooled plan).
    per_prompt = solve_batch(M, D, T, mask, refusal=s, epsilon=eps)
    assert out.value.sum() >= per_prompt.value.sum() - TOL


def test_pooled_one_prompt_is_the_per_prompt_game() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        h, d = rng.random(6), rng.random(6)
        T = float(rng.random() * 0.3)
        mg = margins(h, d, refusal=0)
        one, pooled = solve(mg, T), solve_pooled(mg.M[None, :], mg.Delta[None, :], T)
        np.testing.assert_allclose(pooled.strategy[0], one.strategy, atol=1e-12)
        assert pooled.multiplier == pytest.approx(one.multiplier[0], abs=1e-9)


def test_pooled_spends_the_budget_where_it_buys_most() -> None:
    # Prompt 0: a unit of risk buys 0.8 helpfulness; prompt 1 only 0.1. Mean budget 0.1
    # (a pool of 0.2) goes to prompt 0 first: per-prompt budgets would split it.
    M = np.array([[0.0, 0.16], [0.0, 0.02]])
    D = np.array([[0.0, 0.2], [0.0, 0.2]])
    out = solve_pooled(M, D, 0.1)
    np.testing.assert_allclose(out.strategy, [[0.0, 1.0], [1.0, 0.0]], atol=1e-12)
    assert out.expected_risk.tolist() == pytest.approx([0.2, 0.0])
    assert out.multiplier == pytest.approx(0.1)  # the next unit goes to prompt 1
    per_prompt = solve_batch(M, D, 0.1)
    assert out.value.sum() > per_prompt.value.sum() + 0.05


# --------------------------------------------------------------------------- finite beta


@SETTINGS
@given(games(on_grid=True), st.floats(0.0, 50.0), st.floats(0.0, 3.0))
def test_hinge_exact_equals_highs_lp(game: tuple[Margins, float], beta: float, L: float) -> None:
    mg, T = game
    a = solve(mg, T, beta=beta, penalty=L)
    b = solve(mg, T, beta=beta, penalty=L, method="highs")
    assert a.success and b.success
    assert a.solver == "exact-hinge" and b.solver == "highs-hinge"
    assert abs(a.objective - b.objective) <= 1e-8
    # The objective is the hinge payoff of the returned strategy.
    r = a.expected_risk[0]
    assert a.objective == pytest.approx(a.value - beta * L * max(0.0, r - T), abs=1e-12)


@SETTINGS
@given(games(), st.floats(0.01, 50.0), st.floats(1e-4, 0.5))
def test_soft_cap_is_sandwiched_by_the_hinge(
    game: tuple[Margins, float], beta: float, tau: float
) -> None:
    # c*max(0, x) <= c*tau*softplus(x/tau) <= c*max(0, x) + c*tau*log 2 for every x.
    mg, T = game
    hinge = solve(mg, T, beta=beta)
    soft = solve(mg, T, beta=beta, temperature=tau)
    assert soft.success and soft.solver == "exact-soft"
    assert soft.objective <= hinge.objective + 1e-9
    assert soft.objective >= hinge.objective - beta * tau * math.log(2) - 1e-9


def test_soft_cap_is_optimal_against_a_grid() -> None:
    # Brute force: every two-point mix on a fine grid scores no better than the solver.
    rng = np.random.default_rng(11)
    for _ in range(30):
        m = 6
        mg = margins(*rng_scores(rng, m))
        T, beta, tau = 0.15, 2.0, 0.05
        res = solve(mg, T, beta=beta, temperature=tau)
        c = beta
        best = -np.inf
        w = np.linspace(0.0, 1.0, 201)
        for i in range(m):
            for j in range(m):
                v = (1 - w) * mg.M[i] + w * mg.M[j]
                r = (1 - w) * mg.Delta[i] + w * mg.Delta[j]
                best = max(best, float(np.max(v - c * tau * np.logaddexp(0.0, (r - T) / tau))))
        assert res.objective >= best - 1e-12


def test_soft_converges_to_hard() -> None:
    rng = np.random.default_rng(5)
    for _ in range(100):
        m = int(rng.integers(2, 10))
        mg = margins(*rng_scores(rng, m))
        T = float(rng.random() * 0.3)
        hard = solve(mg, T).value
        errors = [
            abs(solve(mg, T, beta=beta, temperature=tau).value - hard)
            for beta, tau in [(1e2, 1e-2), (1e4, 1e-4), (1e7, 1e-7)]
        ]
        assert errors[-1] <= 1e-5
        assert errors[-1] <= errors[0] + 1e-12


def test_hinge_with_large_penalty_equals_hard() -> None:
    rng = np.random.default_rng(9)
    for _ in range(100):
        m = int(rng.integers(2, 10))
        mg = margins(*rng_scores(rng, m))
        T = float(rng.random() * 0.3)
        hard = solve(mg, T)
        # Once beta*L exceeds every hull slope, exceeding the budget never pays.
        slopes = np.abs(mg.M[:, None] - mg.M[None, :]) / (
            np.abs(mg.Delta[:, None] - mg.Delta[None, :]) + np.eye(m)
        )
        hinge = solve(mg, T, beta=float(slopes.max()) + 1.0)
        assert hinge.value == pytest.approx(hard.value, abs=1e-12)
        np.testing.assert_allclose(hinge.strategy, hard.strategy, atol=1e-12)


def test_small_beta_ignores_the_budget() -> None:
    mg = margins([0.0, 0.5, 0.9], [0.0, 0.1, 0.6])
    res = solve(mg, 0.1, beta=0.0)
    assert res.support == (2,)  # beta = 0: no adversary, most helpful answer
    assert res.multiplier[0] == 0.0


# --------------------------------------------------------------------------- several budgets


@SETTINGS
@given(games(k=1, on_grid=True))
def test_multi_budget_with_one_row_equals_single(game: tuple[Margins, float]) -> None:
    mg, T = game
    flat = Margins(mg.M, mg.Delta2d[0], mg.refusal)
    single = solve(flat, T)
    for method in ("auto", "highs"):
        multi = solve(mg, [T], method=method)
        assert multi.expected_risk.shape == (1,) and multi.multiplier.shape == (1,)
        assert abs(multi.value - single.value) <= TOL


@SETTINGS
@given(st.integers(2, 4).flatmap(lambda k: games(k=k, on_grid=True)), st.data())
def test_multi_budget_is_feasible(game: tuple[Margins, float], data: st.DataObject) -> None:
    mg, _ = game
    k = mg.n_budgets
    T = np.array(data.draw(st.lists(grid, min_size=k, max_size=k)))
    res = solve(mg, T)
    assert_feasible(res, T, tol=1e-7)
    assert res.expected_risk.shape == res.multiplier.shape == res.budget.shape == (k,)
    assert (res.multiplier >= 0.0).all()
    # Complementary slackness: a priced budget is spent.
    priced = res.multiplier > 1e-7
    assert np.allclose(res.expected_risk[priced], T[priced], atol=1e-7)
    # No single budget row can do better than the joint problem with every row.
    for r in range(k):
        one = solve(Margins(mg.M, mg.Delta2d[r], mg.refusal), float(T[r]))
        assert res.value <= one.value + 1e-9


def test_multi_budget_named_example() -> None:
    h = [0.05, 0.5, 0.7, 0.9]
    harm = [[0.0, 0.05, 0.3, 0.2], [0.0, 0.3, 0.05, 0.2]]
    res = solve(margins(h, harm), [0.1, 0.1])
    assert_feasible(res, np.array([0.1, 0.1]), tol=1e-7)
    # Each single rule alone would allow more.
    assert res.value < solve(margins(h, harm[0]), 0.1).value


def test_multi_budget_robust() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        m, k, eps = 6, 2, 0.03
        mg = margins(rng.random(m), rng.random((k, m)))
        T = rng.random(k) * 0.3
        res = solve(mg, T, epsilon=eps)
        e = rng.uniform(-eps, eps, (k, m))
        e[:, 0] = -eps
        e[:, 1:] = eps
        true = (mg.Delta2d + e - e[:, :1]) @ res.strategy
        assert (true <= T + 1e-7).all()


# --------------------------------------------------------------------------- statuses


def test_failed_recheck_fails_closed() -> None:
    mg = margins([0.1, 0.9], [0.0, 0.5])
    T = np.array([0.1])
    Ml, Dl = mg.M.tolist(), mg.Delta.tolist()
    # A strategy that breaks the budget, as a broken solver might return.
    res = _finish_sparse(mg, [(1, 1.0)], T, 0.0, "test-double", Dl, Ml, 0.1)
    assert res.status == Status.NUMERICAL and not res.success
    assert res.refuses and res.value == 0.0
    assert "re-check" in res.message and "budget" in res.message
    res = _finish_sparse(mg, [(0, 0.7), (1, 0.2)], T, 0.0, "test-double", Dl, Ml, 0.1)
    assert res.status == Status.NUMERICAL and "sum" in res.message


def test_result_shape_is_fixed() -> None:
    mg = margins([0.2, 0.8], [0.1, 0.4])
    results = [
        solve(mg, 0.1),
        solve(mg, 0.1, method="highs"),
        solve(mg, 0.1, beta=3.0),
        solve(mg, 0.1, beta=3.0, method="highs"),
        solve(mg, 0.1, beta=3.0, temperature=0.1),
        solve(mg, 0.1, epsilon=0.01),
    ]
    for r in results:
        assert r.strategy.shape == (2,)
        assert r.expected_risk.shape == r.budget.shape == r.multiplier.shape == (1,)
        assert isinstance(r.value, float) and isinstance(r.objective, float)
        assert r.success and r.status == 0


def test_margins_are_relative_to_refusal() -> None:
    mg = margins([0.3, 0.5, 0.1], [0.2, 0.4, 0.1], refusal=1)
    np.testing.assert_allclose(mg.M, [-0.2, 0.0, -0.4])
    np.testing.assert_allclose(mg.Delta, [-0.2, 0.0, -0.3])
    assert not mg.M.flags.writeable
    multi = margins([0.3, 0.5], [[0.2, 0.4], [0.5, 0.1]], refusal=0)
    np.testing.assert_allclose(multi.Delta, [[0.0, 0.2], [0.0, -0.4]])
    assert multi.n_budgets == 2


# --------------------------------------------------------------------------- choose


def test_choose_is_deterministic_with_a_seed() -> None:
    res = solve(margins([0.05, 0.35, 0.6, 0.85], [0.02, 0.04, 0.12, 0.35]), 0.2)
    a = [choose(res, rng=123) for _ in range(5)]
    assert len(set(a)) == 1
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    assert [choose(res, rng=g1) for _ in range(50)] == [choose(res, rng=g2) for _ in range(50)]


def test_choose_frequencies_follow_the_strategy() -> None:
    res = solve(margins([0.05, 0.35, 0.6, 0.85, 0.9], [0.02, 0.04, 0.12, 0.35, 0.8]), 0.2)
    assert len(res.support) == 2
    gen = np.random.default_rng(0)
    n = 20_000
    counts = np.bincount([choose(res, rng=gen) for _ in range(n)], minlength=5)
    freq = counts / n
    # 5 standard deviations of a binomial proportion.
    assert np.all(np.abs(freq - res.strategy) <= 5 * np.sqrt(0.25 / n))
    assert counts[res.strategy == 0].sum() == 0


def test_choose_argmax_breaks_ties_by_risk_then_refusal() -> None:
    # Candidates 1 and 2 tie at weight 0.5 in this hand-built result; 2 is less risky.
    mg = margins([0.1, 0.6, 0.6], [0.1, 0.4, 0.2])
    strategy = np.array([0.0, 0.5, 0.5])
    fake = GameResult(
        strategy, 0.5, 0.5, np.zeros(1), np.zeros(1), np.zeros(1), Status.OPTIMAL, "", "x", mg
    )
    assert choose(fake, "argmax") == 2
    tie = margins([0.1, 0.1], [0.3, 0.3], refusal=1)
    fake = GameResult(
        np.array([0.5, 0.5]),
        0,
        0,
        np.zeros(1),
        np.zeros(1),
        np.zeros(1),
        Status.OPTIMAL,
        "",
        "x",
        tie,
    )
    assert choose(fake, "argmax") == 1  # equal risk: the refusal
    res = solve(margins([0.05, 0.35, 0.6, 0.85], [0.02, 0.04, 0.12, 0.35]), 0.2)
    assert choose(res, "argmax") == int(np.argmax(res.strategy))


# --------------------------------------------------------------------------- adaptive sampling


def _worst_risk(mg: Margins, x: np.ndarray, eps: float) -> np.ndarray:
    """pi.Delta + 2 eps (1 - pi_s) per budget row: the true risk's worst case (docs/method.md)."""
    return mg.Delta2d @ x + 2.0 * eps * (1.0 - x[mg.refusal])


def _adaptive(
    h: np.ndarray, d: np.ndarray, T: float | np.ndarray, eps: float, thr: float,
    beta: float | None, lazy: bool = False, bound: float = 0.0,
) -> tuple[bool, np.ndarray, Margins]:  # fmt: skip
    """What the agent's adaptive path plays: refusal 0, candidate 1 drawn first; ``lazy``
    (sampling.refusal_helpfulness): unless thr <= h_1 <= ``bound`` (where the agent reads it),
    the fast-path check counts the refusal's helpfulness as ``bound``."""
    unread = lazy and not thr <= h[1] <= bound
    first = margins([bound if unread else h[0], h[1]], d[..., :2], refusal=0)
    r1 = solve(first, T, beta=beta, epsilon=eps)
    full = margins(h, d, refusal=0)
    if fast_path(r1, 1, float(h[1]), thr, epsilon=eps):
        x = np.zeros(len(h))
        x[1] = 1.0
        return True, x, full
    return False, solve(full, T, beta=beta, epsilon=eps).strategy, full


@SETTINGS
@given(
    st.data(),
    st.integers(2, 8),
    st.integers(0, 3),
    st.floats(0.0, 0.2),
    prob,
    st.sampled_from([None, 0.5, 5.0]),
    st.booleans(),
)
def test_adaptive_keeps_the_per_prompt_budget_on_both_paths(
    data: st.DataObject, m: int, k: int, eps: float, thr: float, beta: float | None, lazy: bool
) -> None:
    """The invariant of docs/method.md (Adaptive sampling): worst-case extra risk <= T on
    the fast path in every mode, and on the full path whenever the game is the hard LP;
    with the refusal's helpfulness read or not (lazy) alike."""
    if k > 1:
        beta = None  # the finite-beta game has one budget row
    h = np.array(data.draw(st.lists(prob, min_size=m, max_size=m)))
    rows = max(k, 1)
    d = np.array(data.draw(st.lists(prob, min_size=rows * m, max_size=rows * m)))
    d = d if k == 0 else d.reshape(k, m)
    T = np.array(data.draw(st.lists(prob, min_size=rows, max_size=rows)))
    Tb: float | np.ndarray = float(T[0]) if k == 0 else T
    fast, x, mg = _adaptive(h, d, Tb, eps, thr, beta, lazy)
    if fast or beta is None:
        assert np.all(_worst_risk(mg, x, eps) <= T + TOL)
    if fast:
        assert h[1] >= thr and mg.M[1] == pytest.approx(h[1] - h[0])


@SETTINGS
@given(st.data(), st.integers(0, 3), st.floats(0.0, 0.2), prob, st.sampled_from([None, 0.5]), prob)
def test_lazy_refusal_helpfulness_only_adds_fast_paths_where_the_refusal_reads_as_helpful(
    data: st.DataObject, k: int, eps: float, thr: float, beta: float | None, bound: float
) -> None:
    """Reading the refusal's helpfulness lazily never closes a fast path, opens one only
    where the refusal reads at least as helpful as the candidate, and none at all where the
    refusal reads at most the bound (docs/method.md)."""
    if k > 1:
        beta = None
    h = np.array(data.draw(st.lists(prob, min_size=2, max_size=2)))
    rows = max(k, 1)
    d = np.array(data.draw(st.lists(prob, min_size=rows * 2, max_size=rows * 2)))
    d = d if k == 0 else d.reshape(k, 2)
    T = np.array(data.draw(st.lists(prob, min_size=rows, max_size=rows)))
    Tb: float | np.ndarray = float(T[0]) if k == 0 else T
    read, _, _ = _adaptive(h, d, Tb, eps, thr, beta)
    lazy, x, mg = _adaptive(h, d, Tb, eps, thr, beta, lazy=True, bound=bound)
    assert lazy or not read
    if lazy and not read:
        assert h[0] >= h[1] - TOL and h[0] > bound
    if lazy:  # the bound the proof rests on, with the true scores
        assert np.all(_worst_risk(mg, x, eps) <= T + TOL)


@SETTINGS
@given(games(min_m=2, max_m=8), st.floats(0.0, 0.2), prob)
def test_fast_path_only_when_the_restricted_game_answers_alone(
    game: tuple[Margins, float], eps: float, thr: float
) -> None:
    mg, T = game
    # rebuild scores with refusal 0 from the drawn margins (h_s = d_s = 0.5 keeps [0, 1])
    h = np.clip(0.5 + np.roll(mg.M, -mg.refusal), 0.0, 1.0)
    d = np.clip(0.5 + np.roll(mg.Delta, -mg.refusal), 0.0, 1.0)
    r1 = solve(margins(h[:2], d[:2]), T, epsilon=eps)
    ok = fast_path(r1, 1, float(h[1]), thr, epsilon=eps)
    alone = r1.strategy[1] == 1.0 and d[1] - d[0] + 2 * eps <= T
    assert ok == (alone and h[1] >= thr)


def test_lazy_reads_the_refusal_only_between_the_threshold_and_the_bound() -> None:
    got = reads_refusal_helpfulness([0.4, 0.5, 0.6, 0.65, 0.7], threshold=0.5, bound=0.65)
    assert got.tolist() == [False, True, True, True, False]
    assert not reads_refusal_helpfulness(0.9, 0.5, 0.0)  # bound 0: never read
    assert not reads_refusal_helpfulness([0.3, 0.6], 0.7, 0.65).any()  # bound below threshold


def test_fast_path_declines_below_threshold_mix_and_hinge_overrun() -> None:
    mg = margins([0.2, 0.9], [0.1, 0.15])  # Delta_1 = 0.05
    r = solve(mg, 0.1)
    assert fast_path(r, 1, 0.9, 0.5)
    assert not fast_path(r, 1, 0.9, 0.95)  # not helpful enough
    assert not fast_path(r, 1, 0.9, 0.5, epsilon=0.03)  # 0.05 + 0.06 > T
    mixed = solve(mg, 0.02)  # the budget binds: a mix with the refusal
    assert 0 < mixed.strategy[1] < 1 and not fast_path(mixed, 1, 0.9, 0.0)
    # A cheap hinge plays the candidate alone past T: never a fast path.
    hinge = solve(mg, 0.01, beta=0.1)
    assert hinge.strategy[1] == 1.0 and not fast_path(hinge, 1, 0.9, 0.0)
    with pytest.raises(ValueError, match="refusal"):
        fast_path(r, 0, 0.9, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        fast_path(r, 1, 0.9, 1.5)


# --------------------------------------------------------------------------- traffic price


def _brute_best(M: np.ndarray, Dw: np.ndarray, s: int, price: float) -> int:
    score = M - price * Dw
    top = [i for i in range(len(M)) if score[i] >= score.max() - 1e-12]
    return min(top, key=lambda i: (Dw[i], i != s, i))


@SETTINGS
@given(games(), st.floats(0.0, 20.0), st.sampled_from([0.0, 0.05]))
def test_best_response_is_the_priced_argmax(
    game: tuple[Margins, float], price: float, eps: float
) -> None:
    mg, _ = game
    Dw = mg.Delta + 2 * eps
    Dw[mg.refusal] = 0.0
    assert best_response(mg, price, epsilon=eps) == _brute_best(mg.M, Dw, mg.refusal, price)


@SETTINGS
@given(st.data(), st.integers(1, 8), st.integers(1, 5))
def test_calibrated_price_keeps_the_mean_risk_within_the_budget(
    data: st.DataObject, n: int, m: int
) -> None:
    s, h, d, mask = _draw_batch(data, n, m, grid)
    T = data.draw(grid)
    eps = data.draw(st.sampled_from([0.0, 0.01]))
    M, D = h - h[:, s : s + 1], d - d[:, s : s + 1]
    cal = calibrate_price(M, D, T, mask, refusal=s, epsilon=eps)
    pooled = solve_pooled(M, D, T, mask, refusal=s, epsilon=eps)
    assert cal.success, cal.message
    assert cal.price == pooled.multiplier
    # Per prompt O(m), each a best response: the mean charged risk stays within T.
    risks, values = [], []
    for p in range(n):
        mg, _ = _compressed(M[p], D[p], mask[p], s)
        i = best_response(mg, cal.price, epsilon=eps)
        risks.append(0.0 if i == mg.refusal else mg.Delta[i] + 2 * eps)
        values.append(mg.M[i])
        # never riskier than the pooled plan on this prompt (ties go to less risk)
        Dw = D[p] + 2 * eps
        Dw[s] = 0.0
        assert risks[-1] <= float(pooled.strategy[p] @ np.where(mask[p], Dw, 0.0)) + TOL
    assert np.mean(risks) <= T + TOL
    assert cal.mean_risk == pytest.approx(np.mean(risks), abs=1e-12)
    assert cal.mean_value == pytest.approx(np.mean(values), abs=1e-12)
    assert cal.mean_value <= cal.pooled_value + TOL


def test_price_of_risk_on_a_named_example() -> None:
    # Prompt 0 buys 0.8 helpfulness per unit of risk, prompt 1 only 0.1: with a mean budget
    # of 0.1 the price sits at 0.1, prompt 0 answers and prompt 1 refuses.
    M = np.array([[0.0, 0.16], [0.0, 0.02]])
    D = np.array([[0.0, 0.2], [0.0, 0.2]])
    cal = calibrate_price(M, D, 0.1)
    assert cal.price == pytest.approx(0.1)
    assert [best_response(Margins(M[p], D[p]), cal.price) for p in range(2)] == [1, 0]
    assert best_response(Margins(M[0], D[0][None, :]), cal.price) == 1  # a (1, m) risk row
    assert cal.mean_risk == pytest.approx(0.1) and cal.answered == 0.5
    slack = calibrate_price(M, D, 0.5)
    assert slack.price == 0.0 and slack.answered == 1.0
    with pytest.raises(ValueError, match="one budget"):
        best_response(margins([0.1, 0.5], [[0.1, 0.2], [0.0, 0.1]]), 0.1)
    with pytest.raises(ValueError, match="price"):
        best_response(Margins(M[0], D[0]), -1.0)
