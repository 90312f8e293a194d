"""Bootstrap intervals, paired comparisons and budget tuning."""

from __future__ import annotations

import numpy as np
import pytest

from safetygame.errors import ConfigError
from safetygame.eval.methods import ScoreTable, expected_accuracy, run_method
from safetygame.eval.stats import bootstrap_ci, paired_bootstrap, tune_budget


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
    res = tune_budget(t, "filter", [1.0, 0.0, 0.3, 0.45, 0.6, 0.8])
    assert res.budget == 0.6  # first T at which all three items are answered
    assert res.accuracy == pytest.approx(1.0)
    assert [g[0] for g in res.grid] == [0.0, 0.3, 0.45, 0.6, 0.8, 1.0]
    assert [round(g[2], 6) for g in res.grid][:3] == [0.0, round(2 / 3, 6), round(2 / 3, 6)]
    # Ties among the grid go to the smaller T: 0.3 and 0.45 tie below 0.6.
    res2 = tune_budget(t, "filter", [0.45, 0.3])
    assert res2.budget == 0.3


def test_tune_budget_safety_game_uses_accuracy_of_the_mix() -> None:
    t = _risky_correct_table()
    res = tune_budget(t, "safety-game", [0.0, 0.15, 0.3, 0.6], betas=[None, 1e6])
    best = max(
        float(expected_accuracy(run_method("safety-game", t, budget=T), t).mean())
        for T in (0.0, 0.15, 0.3, 0.6)
    )
    assert res.accuracy == pytest.approx(best)
    assert res.budget == 0.6 and res.beta is None
    with pytest.raises(ConfigError, match="grid is empty"):
        tune_budget(t, "filter", [])
