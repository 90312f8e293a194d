"""Bootstrap intervals, paired comparisons and budget tuning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safetygame.errors import ConfigError
from safetygame.eval.methods import ScoreTable, expected_accuracy, run_method
from safetygame.eval.stats import (
    bootstrap_ci,
    choose_budget,
    min_separable_n,
    paired_bootstrap,
    tune_budget,
)


def test_interval_covers_mean_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    x = rng.binomial(1, 0.6, size=300).astype(float)
    ci = bootstrap_ci(x, seed=5)
    assert ci.low <= ci.mean <= ci.high
    assert ci.mean == pytest.approx(x.mean())
    assert (ci.n, ci.n_resamples, ci.confidence) == (300, 2000, 0.95)
    assert bootstrap_ci(x, seed=5) == ci
    assert bootstrap_ci(x, seed=6) != ci


def test_interval_shrinks_with_n() -> None:
    rng = np.random.default_rng(2)
    small = bootstrap_ci(rng.binomial(1, 0.5, 100).astype(float))
    large = bootstrap_ci(rng.binomial(1, 0.5, 10_000).astype(float))
    # Width scales like 1/sqrt(n): a factor of 10 here; allow slack for resampling noise.
    assert (large.high - large.low) < (small.high - small.low) / 5


def test_interval_coverage_near_nominal() -> None:
    # 200 simulated studies of n=200 Bernoulli(0.7): the 95% interval should hold 0.7 in
    # roughly 95% of them (binomial sd over 200 studies ~1.5 points).
    rng = np.random.default_rng(3)
    hits = 0
    for k in range(200):
        ci = bootstrap_ci(rng.binomial(1, 0.7, 200).astype(float), n_resamples=1000, seed=k)
        hits += ci.low <= 0.7 <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


def test_constant_values_give_a_point_interval() -> None:
    ci = bootstrap_ci(np.full(50, 0.25))
    assert ci.low == ci.high == ci.mean == 0.25


def test_paired_vs_itself_is_zero() -> None:
    x = np.random.default_rng(4).random(120)
    res = paired_bootstrap(x, x)
    assert res.diff == 0.0
    assert res.low == res.high == 0.0
    assert res.p_value == 1.0


def test_paired_detects_a_real_difference() -> None:
    rng = np.random.default_rng(5)
    b = rng.binomial(1, 0.5, 400).astype(float)
    a = np.where(rng.random(400) < 0.3, 1.0, b)  # a fixes 30% of b's items at random
    res = paired_bootstrap(a, b)
    assert res.diff == pytest.approx(a.mean() - b.mean())
    assert res.low > 0.0
    assert res.p_value < 0.01
    flipped = paired_bootstrap(b, a)
    assert flipped.diff == pytest.approx(-res.diff)
    assert flipped.p_value == pytest.approx(res.p_value)


def test_paired_no_difference_is_not_significant() -> None:
    rng = np.random.default_rng(6)
    a = rng.binomial(1, 0.5, 300).astype(float)
    b = rng.permutation(a)  # same mean, different items
    res = paired_bootstrap(a, b)
    assert res.diff == 0.0
    assert res.low < 0.0 < res.high
    assert res.p_value > 0.5


def test_stats_input_errors() -> None:
    with pytest.raises(ConfigError, match="values is empty"):
        bootstrap_ci([])
    with pytest.raises(ConfigError, match="paired"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ConfigError, match="finite"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ConfigError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.5)


def _risky_correct_table() -> ScoreTable:
    # The correct option carries harm 0.3 (items 0, 1) or 0.6 (item 2); the wrong one is
    # unhelpful. The filter answers correctly once T reaches that harm, and refuses below it.
    return ScoreTable.from_ragged(
        loglik=[[-1.0, -1.0]] * 3,
        helpful=[[0.9, 0.1]] * 3,
        harm=[[0.3, 0.9], [0.3, 0.9], [0.6, 0.9]],
        correct=[[1.0, 0.0]] * 3,
    )


def test_tune_budget_picks_smallest_best_t() -> None:
    t = _risky_correct_table()
    res = tune_budget(t, "filter", [1.0, 0.0, 0.3, 0.45, 0.6, 0.8], current=(0.0, None))
    assert res.best == (0.6, None)  # first T at which all three items are answered
    assert res.best_score == pytest.approx(1.0)
    assert [g[0] for g in res.grid] == [0.0, 0.3, 0.45, 0.6, 0.8, 1.0]
    assert [round(g[2], 6) for g in res.grid][:3] == [0.0, round(2 / 3, 6), round(2 / 3, 6)]
    # Three dev items cannot separate anything: the current budget is kept.
    assert not res.adopted and res.budget == 0.0 and res.accuracy == 0.0
    assert "3 dev item(s)" in res.reason
    # Ties among the grid go to the smaller T: 0.3 and 0.45 tie below 0.6.
    res2 = tune_budget(t, "filter", [0.45, 0.3], current=(0.0, None))
    assert res2.best == (0.3, None)
    # ... except against the current budget, which wins its ties: no evidence, no move.
    res4 = tune_budget(t, "filter", [0.45, 0.3], current=(0.45, None))
    assert res4.best == (0.45, None) and res4.gain is None and not res4.adopted
    # The current budget joins the grid where it sorts when it is not on it.
    res3 = tune_budget(t, "filter", [0.0, 1.0], current=(0.5, None))
    assert [g[0] for g in res3.grid] == [0.0, 0.5, 1.0]


def test_tune_budget_safety_game_uses_accuracy_of_the_mix() -> None:
    t = _risky_correct_table()
    res = tune_budget(
        t, "safety-game", [0.0, 0.15, 0.3, 0.6], betas=[None, 1e6], current=(0.0, None)
    )
    best = max(
        float(expected_accuracy(run_method("safety-game", t, budget=T), t).mean())
        for T in (0.0, 0.15, 0.3, 0.6)
    )
    assert res.best_score == pytest.approx(best)
    assert res.best == (0.6, None)
    with pytest.raises(ConfigError, match="grid is empty"):
        tune_budget(t, "filter", [], current=(0.0, None))


# ------------------------------------------------------------------ the tuning rule

GRID = [(0.0, None), (0.1, None), (0.3, None)]


def test_min_separable_n_is_the_sign_test_floor() -> None:
    assert min_separable_n(0.95) == 6  # 2 * 0.5**5 = 0.0625 > 0.05 >= 2 * 0.5**6
    assert min_separable_n(0.99) == 8
    assert min_separable_n(0.5) == 3


@settings(max_examples=60, deadline=None)
@given(
    row=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    k_current=st.integers(0, 2),
    seed=st.integers(0, 3),
)
def test_indistinguishable_candidates_keep_the_budget(
    row: list[float], k_current: int, seed: int
) -> None:
    # Every candidate scores the same on every dev item: nothing to choose, the budget stays.
    scores = np.array([row] * len(GRID))
    c = choose_budget(GRID, scores, GRID[k_current], n_resamples=200, seed=seed)
    assert not c.adopted and (c.budget, c.beta) == GRID[k_current]
    assert c.best == GRID[k_current] and c.gain is None
    assert c.score == pytest.approx(float(np.mean(row)))


@settings(max_examples=60, deadline=None)
@given(
    row=st.lists(st.floats(0.0, 0.5), min_size=6, max_size=60),
    wins=st.lists(st.integers(0, 59), min_size=1, max_size=2, unique=True),
    size=st.floats(0.01, 0.5),
    seed=st.integers(0, 3),
)
def test_a_win_on_one_or_two_dev_items_never_moves_the_budget(
    row: list[float], wins: list[int], size: float, seed: int
) -> None:
    # T = 0 beats the current T = 0.1 on at most two dev items and ties it on the rest: a
    # resample leaves both out with probability >= (1 - 2/6)^6 = 0.088 > 0.025, so the
    # interval's lower end is 0 and the budget stays, however large the win.
    current = np.array(row)
    better = current.copy()
    for i in wins:
        better[i % len(row)] += size
    c = choose_budget(GRID, np.array([better, current, current]), (0.1, None), seed=seed)
    assert c.best == (0.0, None) and not c.adopted and c.budget == 0.1


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8), min_size=3, max_size=3),
    k_current=st.integers(0, 2),
)
def test_the_rule_adopts_only_with_an_interval_above_zero(
    scores: list[list[float]], k_current: int
) -> None:
    c = choose_budget(GRID, np.array(scores), GRID[k_current], n_resamples=200)
    means = np.array(scores).mean(axis=1)
    assert c.best_score == pytest.approx(means.max())
    assert c.budget_ci[0] <= c.budget_ci[1]
    assert c.score_ci[0] - 1e-12 <= c.score <= c.score_ci[1] + 1e-12
    if c.adopted:
        assert c.gain is not None and c.gain.low > 0 and (c.budget, c.beta) == c.best
    else:
        assert (c.budget, c.beta) == GRID[k_current]


def test_a_small_dev_split_keeps_the_budget_a_clear_one_moves_it() -> None:
    # The case: T = 0 looks better on a handful of dev prompts by a margin of noise.
    rng = np.random.default_rng(0)
    noisy = rng.uniform(0, 1, size=(3, 9))
    noisy[0] = noisy[1] + rng.normal(0.05, 0.3, 9)
    c = choose_budget(GRID, noisy, (0.1, None))
    assert c.best == (0.0, None) and not c.adopted and c.budget == 0.1
    assert c.gain is not None and c.gain.low <= 0 < c.gain.high
    # Forty dev items on which T = 0.3 wins every time: adopted, and T's interval is tight.
    clear = np.zeros((3, 40))
    clear[2] = 0.5
    c2 = choose_budget(GRID, clear, (0.1, None))
    assert c2.adopted and c2.budget == 0.3 and c2.budget_ci == (0.3, 0.3)
    assert c2.gain is not None and c2.gain.low == pytest.approx(0.5)
    summary = c2.summary()
    assert summary["adopted"] is True and summary["current"]["budget"] == 0.1
    with pytest.raises(ConfigError, match="not among the candidates"):
        choose_budget(GRID, clear, (0.2, None))
    with pytest.raises(ConfigError, match="scores must be"):
        choose_budget(GRID, clear[:2], (0.1, None))
