"""Score-based methods on hand-built score tables (no model calls)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from safetygame.errors import ConfigError
from safetygame.eval.methods import (
    METHODS,
    MethodParams,
    ScoreTable,
    argmax_accuracy,
    consensus_game,
    expected_accuracy,
    expected_extra_risk,
    generator_distribution,
    initial_policies,
    refusal_rate,
    run_method,
)

F = NDArray[np.float64]


def table(
    loglik: list[list[float]],
    helpful: list[list[float]],
    harm: list[list[float]],
    correct: list[list[float]] | None = None,
    **kw: object,
) -> ScoreTable:
    if correct is None:
        correct = [[1.0] + [0.0] * (len(r) - 1) for r in loglik]
    return ScoreTable.from_ragged(loglik, helpful, harm, correct, **kw)  # type: ignore[arg-type]


def options_only(s: F, t: ScoreTable) -> F:
    out: F = s[:, : t.n_options]
    return out


# Random tables for property tests: n items, m options, probabilities strictly inside (0, 1).
prob = st.floats(0.01, 0.99)


@st.composite
def tables(draw: st.DrawFn, max_m: int = 5) -> ScoreTable:
    n = draw(st.integers(1, 4))
    m = draw(st.integers(2, max_m))
    cells = st.lists(prob, min_size=m, max_size=m)
    ll = draw(st.lists(st.lists(st.floats(-5, 0), min_size=m, max_size=m), min_size=n, max_size=n))
    h = draw(st.lists(cells, min_size=n, max_size=n))
    d = draw(st.lists(cells, min_size=n, max_size=n))
    return table(ll, h, d)


# --------------------------------------------------------------------------- simple rankings


def test_g_picks_highest_loglik_and_splits_ties() -> None:
    t = table(
        [[-2.0, -0.5, -1.0], [-1.0, -1.0, -3.0]],
        [[0.5, 0.5, 0.5]] * 2,
        [[0.1, 0.1, 0.1]] * 2,
    )
    s = run_method("G", t)
    np.testing.assert_allclose(s[0], [0, 1, 0, 0])
    np.testing.assert_allclose(s[1], [0.5, 0.5, 0, 0])  # a tie is split, never positional
    dist = generator_distribution(t)
    np.testing.assert_allclose(dist.sum(axis=1), 1.0)
    assert np.argmax(dist[0]) == 1


def test_d_picks_highest_helpfulness() -> None:
    t = table([[-0.1, -3.0, -2.0]], [[0.2, 0.9, 0.4]], [[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(run_method("D", t)[0], [0, 1, 0, 0])


def test_mi_prefers_the_best_product() -> None:
    # G likes option 0, D likes option 1; option 2 is second on both and wins the product.
    ll = np.log([0.5, 0.1, 0.4]).tolist()
    t = table([ll], [[0.3, 0.9, 0.8]], [[0.0, 0.0, 0.0]])
    products = np.array([0.5 * 0.3, 0.1 * 0.9, 0.4 * 0.8])
    s = run_method("MI", t)
    assert int(np.argmax(s[0])) == int(np.argmax(products)) == 2


def test_padding_never_gets_mass() -> None:
    t = table(
        [[-1.0, -0.2], [-0.3, -0.1, -2.0, -0.9]],
        [[0.4, 0.6], [0.2, 0.9, 0.1, 0.3]],
        [[0.1, 0.2], [0.3, 0.0, 0.5, 0.2]],
    )
    assert t.mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    for name in METHODS:
        s = run_method(name, t, budget=0.1)
        assert s.shape == (2, 5)
        np.testing.assert_allclose(s.sum(axis=1), 1.0, atol=1e-9)
        assert np.all(s[0, 2:4] == 0.0), name
        assert np.all(s >= 0.0)


# --------------------------------------------------------------------------- risk filter & game


def test_filter_refuses_when_all_risky() -> None:
    t = table([[-1.0, -2.0]], [[0.9, 0.8]], [[0.6, 0.7]])
    s = run_method("filter", t, budget=0.2)
    np.testing.assert_allclose(s[0], [0, 0, 1])


def test_filter_takes_most_helpful_safe_option() -> None:
    t = table([[-1.0, -2.0, -3.0]], [[0.9, 0.6, 0.5]], [[0.6, 0.1, 0.0]])
    np.testing.assert_allclose(run_method("filter", t, budget=0.2)[0], [0, 1, 0, 0])


def test_safety_game_t0_all_risky_refuses() -> None:
    t = table([[-1.0, -2.0]], [[0.9, 0.8]], [[0.6, 0.7]])
    s = run_method("safety-game", t, budget=0.0)
    np.testing.assert_allclose(s[0], [0, 0, 1])
    assert argmax_accuracy(s, t)[0] == 0.0  # refusing scores as wrong
    assert expected_accuracy(s, t)[0] == 0.0


@given(tables())
@settings(max_examples=40, deadline=None)
def test_safety_game_huge_budget_is_helpful_argmax(t: ScoreTable) -> None:
    big = run_method("safety-game", t, budget=2.0)  # margins are at most 1: never binds
    ref = run_method("helpful-argmax", t)
    # Same value: the game may break exact ties differently, but never loses helpfulness.
    h = np.concatenate([t.helpful, np.zeros((t.n_items, 1))], axis=1)
    np.testing.assert_allclose((big * h).sum(axis=1), (ref * h).sum(axis=1), atol=1e-9)


@given(tables(), st.floats(0.0, 0.5))
@settings(max_examples=60, deadline=None)
def test_safety_game_meets_budget_and_beats_filter(t: ScoreTable, budget: float) -> None:
    game = run_method("safety-game", t, budget=budget)
    filt = run_method("filter", t, budget=budget)
    harm = np.concatenate([t.harm, np.zeros((t.n_items, 1))], axis=1)
    help_ = np.concatenate([t.helpful, np.zeros((t.n_items, 1))], axis=1)
    assert np.all((game * harm).sum(axis=1) <= budget + 1e-9)
    # The filter's answer is feasible for the LP, so the LP is at least as helpful.
    assert np.all((game * help_).sum(axis=1) >= (filt * help_).sum(axis=1) - 1e-9)


@given(tables(), st.floats(0.0, 0.5))
@settings(max_examples=60, deadline=None)
def test_pooled_game_meets_the_mean_budget_and_beats_both(t: ScoreTable, budget: float) -> None:
    pooled = run_method("safety-game-pooled", t, budget=budget)
    assert np.allclose(pooled.sum(axis=1), 1.0)
    assert expected_extra_risk(pooled, t).mean() <= budget + 1e-9
    help_ = np.concatenate([t.helpful, np.zeros((t.n_items, 1))], axis=1)
    value = (pooled * help_).sum(axis=1).mean()
    # Per-item plans (the game's, the filter's) are feasible pooled plans.
    for other in ("safety-game", "filter"):
        s = run_method(other, t, budget=budget)
        assert value >= (s * help_).sum(axis=1).mean() - 1e-9


def test_pooled_game_is_hard_only() -> None:
    t = table([[-1.0, -1.0]], [[0.2, 0.9]], [[0.0, 0.5]])
    with pytest.raises(ConfigError, match="hard budget only"):
        run_method("safety-game-pooled", t, budget=0.1, beta=1.0)


def test_safety_game_mixes_to_the_budget() -> None:
    # A safe, unhelpful option and a helpful, risky one: the optimum mixes to risk == T.
    t = table([[-1.0, -1.0]], [[0.2, 0.9]], [[0.0, 0.5]])
    s = run_method("safety-game", t, budget=0.25)
    risk = float(s[0, :2] @ t.harm[0])
    assert risk == pytest.approx(0.25)
    assert expected_extra_risk(s, t)[0] == pytest.approx(0.25)
    assert refusal_rate(s)[0] == pytest.approx(1.0 - s[0, :2].sum())
    assert 0.0 < s[0, 1] < 1.0
    # The filter cannot mix: it drops option 1 and answers with option 0.
    np.testing.assert_allclose(run_method("filter", t, budget=0.25)[0], [1, 0, 0])


def test_safety_game_refusal_scores_shift_margins() -> None:
    # With a risky refusal (harm 0.4), an answer with harm 0.5 costs only 0.1 extra.
    t = table(
        [[-1.0]] * 1 + [[-1.0]],
        [[0.9], [0.9]],
        [[0.5], [0.5]],
        refusal_helpful=[0.1, 0.1],
        refusal_harm=[0.4, 0.0],
    )
    s = run_method("safety-game", t, budget=0.1)
    np.testing.assert_allclose(s[0], [1, 0])
    assert s[1, 0] == pytest.approx(0.1 / 0.5)


def test_safety_game_finite_beta_large_equals_hard() -> None:
    t = table([[-1.0, -1.0, -2.0]], [[0.2, 0.9, 0.5]], [[0.0, 0.5, 0.2]])
    hard = run_method("safety-game", t, budget=0.15)
    soft = run_method("safety-game", t, budget=0.15, beta=1e6)
    np.testing.assert_allclose(soft, hard, atol=1e-9)
    # A small beta (cheap penalty) may exceed the budget for helpfulness.
    cheap = run_method("safety-game", t, budget=0.15, beta=0.01)
    assert float(cheap[0, :3] @ t.harm[0]) >= 0.15 - 1e-12


def test_baseline_fallback_t0_equals_g_when_deviation_costs_risk() -> None:
    # G's option (index 1) is the least harmful, so any deviation adds risk: T=0 keeps G.
    t = table(
        [[-2.0, -0.1, -1.0], [-0.1, -2.0, -3.0]],
        [[0.9, 0.2, 0.8], [0.1, 0.9, 0.95]],
        [[0.5, 0.1, 0.3], [0.0, 0.2, 0.4]],
    )
    np.testing.assert_allclose(
        run_method("safety-game-baseline", t, budget=0.0), run_method("G", t)
    )


def test_baseline_fallback_deviates_when_it_pays() -> None:
    # Option 0 is both safer and more helpful than G's pick: worth deviating even at T=0.
    t = table([[-2.0, -0.1]], [[0.9, 0.3]], [[0.1, 0.4]])
    np.testing.assert_allclose(run_method("safety-game-baseline", t, budget=0.0)[0], [1, 0, 0])


@given(tables(), st.floats(0.0, 0.5))
@settings(max_examples=60, deadline=None)
def test_baseline_fallback_never_worse_than_g(t: ScoreTable, budget: float) -> None:
    s = run_method("safety-game-baseline", t, budget=budget)
    g = run_method("G", t)
    assert np.all(s[:, -1] == 0.0)  # no refusal in this fallback
    h, d = t.helpful, t.harm
    hs, ds = (options_only(s, t) * h).sum(1), (options_only(s, t) * d).sum(1)
    hg, dg = (options_only(g, t) * h).sum(1), (options_only(g, t) * d).sum(1)
    assert np.all(hs >= hg - 1e-9)
    assert np.all(ds <= dg + budget + 1e-9)


# --------------------------------------------------------------------------- consensus game


def test_consensus_converges_and_policies_are_distributions() -> None:
    rng = np.random.default_rng(0)
    t = ScoreTable(
        loglik=rng.normal(size=(30, 4)),
        helpful=rng.uniform(0.05, 0.95, (30, 4)),
        harm=np.zeros((30, 4)),
        mask=np.ones((30, 4), dtype=bool),
        correct=np.eye(4)[rng.integers(0, 4, 30)],
    )
    r = consensus_game(t)
    assert r.iterations == 5000
    assert r.last_change < 1e-3
    np.testing.assert_allclose(r.pi_g.sum(axis=2), 1.0)
    np.testing.assert_allclose(r.pi_d.sum(axis=2), 1.0)
    # Fewer iterations are further from the fixed point than more iterations.
    assert consensus_game(t, iterations=50).last_change > r.last_change


@given(st.lists(st.floats(-6, 0), min_size=2, max_size=6), prob)
@settings(max_examples=40, deadline=None)
def test_er_g_matches_g_with_uninformative_discriminator(ll: list[float], h: float) -> None:
    m = len(ll)
    t = table([ll], [[h] * m], [[0.0] * m])
    r = consensus_game(t, iterations=300)
    # Every update is increasing in the generator's score, so the ranking is preserved.
    assert _same_order(r.er_g[0], np.array(ll))


def _same_order(a: F, b: F) -> bool:
    """a and b rank every pair the same way (pairs within 1e-6 in b are not checked: float
    rounding may tie them in a)."""
    da = np.sign(a[:, None] - a[None, :])
    gap = b[:, None] - b[None, :]
    return bool(np.all((np.abs(gap) <= 1e-6) | (da == np.sign(gap))))


@given(st.lists(prob, min_size=2, max_size=6), st.floats(-3, 0))
@settings(max_examples=40, deadline=None)
def test_er_d_matches_d_with_uninformative_generator(h: list[float], ll: float) -> None:
    m = len(h)
    t = table([[ll] * m], [h], [[0.0] * m])
    r = consensus_game(t, iterations=300)
    assert _same_order(r.er_d[0], np.array(h))


@given(tables(), st.data())
@settings(max_examples=40, deadline=None)
def test_er_picks_an_option_both_players_prefer(t: ScoreTable, data: st.DataObject) -> None:
    # Make option k strictly best for both the generator and the discriminator.
    k = data.draw(st.integers(0, t.n_options - 1))
    ll, h = np.array(t.loglik), np.array(t.helpful)
    ll[:, k] = ll.max(axis=1) + 0.5
    h[:, k] = np.minimum(h.max(axis=1) + 0.005, 0.999)
    t2 = ScoreTable(ll, h, t.harm, t.mask, t.correct)
    for name in ("ER-G", "ER-D", "MI", "SC"):
        s = run_method(name, t2, iterations=300)
        assert np.all(np.argmax(s, axis=1) == k), name


@given(tables())
@settings(max_examples=30, deadline=None)
def test_sc_equals_g_without_incorrect_prompt_scores(t: ScoreTable) -> None:
    np.testing.assert_allclose(run_method("SC", t), run_method("G", t))


def test_sc_keeps_g_ties_that_normalising_would_blur() -> None:
    # Found by hypothesis: -5e-12 is outside G's tie tolerance, but the softmax probabilities
    # differ by less than it, so SC on probabilities split three ways where G splits two.
    t = table([[0.0, 0.0, -5.08e-12]], [[0.5] * 3], [[0.0] * 3])
    np.testing.assert_allclose(run_method("G", t)[0], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(run_method("SC", t), run_method("G", t))


def test_sc_uses_the_incorrect_prompt() -> None:
    # Both options equally likely when asked for a correct answer; option 0 is also likely
    # when asked for an incorrect one, so the contrast favours option 1.
    t = table([[-1.0, -1.0]], [[0.5, 0.5]], [[0.0, 0.0]], loglik_incorrect=[[-0.2, -3.0]])
    np.testing.assert_allclose(run_method("SC", t)[0], [0, 1, 0])
    pi_g1, pi_d1 = initial_policies(t)
    np.testing.assert_allclose(pi_g1.sum(axis=2), 1.0)
    np.testing.assert_allclose(pi_d1.sum(axis=2), 1.0)


@given(tables(max_m=4), st.data())
@settings(max_examples=25, deadline=None)
def test_consensus_is_permutation_equivariant(t: ScoreTable, data: st.DataObject) -> None:
    perm = np.array(data.draw(st.permutations(range(t.n_options))))
    t2 = ScoreTable(t.loglik[:, perm], t.helpful[:, perm], t.harm[:, perm], t.mask, t.correct)
    a, b = consensus_game(t, iterations=200), consensus_game(t2, iterations=200)
    np.testing.assert_allclose(a.pi_g[:, :, perm], b.pi_g, atol=1e-12)
    np.testing.assert_allclose(a.pi_d[:, perm, :], b.pi_d, atol=1e-12)


# --------------------------------------------------------------------------- accuracy & table


def test_accuracy_counts_mass_on_correct_and_refusal_as_wrong() -> None:
    t = table([[-1.0, -1.0, -1.0]] * 2, [[0.5] * 3] * 2, [[0.0] * 3] * 2)
    s = np.array([[0.5, 0.3, 0.0, 0.2], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(expected_accuracy(s, t), [0.5, 0.0])
    np.testing.assert_allclose(argmax_accuracy(s, t), [1.0, 0.0])
    tie = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(argmax_accuracy(tie, t), [0.5, 0.0])


def test_mc2_style_several_correct() -> None:
    t = table([[-1.0, -0.5, -0.2]], [[0.5] * 3], [[0.0] * 3], correct=[[1.0, 1.0, 0.0]])
    s = np.array([[0.25, 0.25, 0.5, 0.0]])
    np.testing.assert_allclose(expected_accuracy(s, t), [0.5])


def test_score_table_validation() -> None:
    with pytest.raises(ConfigError, match=r"ScoreTable\.helpful must hold probabilities"):
        table([[-1.0, -1.0]], [[1.5, 0.2]], [[0.0, 0.0]])
    with pytest.raises(ConfigError, match=r"ScoreTable.harm\[0\] has 1 options"):
        table([[-1.0, -1.0]], [[0.5, 0.2]], [[0.0]])
    with pytest.raises(ConfigError, match=r"ScoreTable\.loglik must be finite"):
        table([[-np.inf, -1.0]], [[0.5, 0.2]], [[0.0, 0.0]])
    with pytest.raises(ConfigError, match="padding last"):
        ScoreTable(
            np.zeros((1, 2)),
            np.zeros((1, 2)),
            np.zeros((1, 2)),
            np.array([[False, True]]),
            np.zeros((1, 2)),
        )
    with pytest.raises(ConfigError, match="0/1 labels"):
        table([[-1.0, -1.0]], [[0.5, 0.2]], [[0.0, 0.0]], correct=[[0.5, 0.5]])


def test_take_and_take_ids() -> None:
    t = table(
        [[-1.0, -2.0], [-3.0, -1.0], [-1.0, -1.5]],
        [[0.5, 0.5]] * 3,
        [[0.1, 0.2]] * 3,
        ids=("a", "b", "c"),
        categories=("x", None, "z"),
    )
    sub = t.take_ids(["c", "a"])
    assert sub.ids == ("c", "a")
    assert sub.categories == ("z", "x")
    np.testing.assert_allclose(sub.loglik, [[-1.0, -1.5], [-1.0, -2.0]])
    with pytest.raises(ConfigError, match="unknown id"):
        t.take_ids(["q"])


def test_run_method_errors() -> None:
    t = table([[-1.0, -2.0]], [[0.5, 0.5]], [[0.1, 0.2]])
    with pytest.raises(ConfigError, match="unknown method"):
        run_method("beam", t)
    with pytest.raises(ConfigError, match="unknown method parameter"):
        run_method("G", t, temperature=2.0)
    with pytest.raises(ConfigError, match="beta"):
        MethodParams(beta=-1.0)
