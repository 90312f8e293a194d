"""Metrics, splits and the noise simulation of ``eval probes``; one real run on SmolLM2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from safetygame.cli import main
from safetygame.eval.datasets import load
from safetygame.eval.probe_quality import (
    DesignResult,
    SplitMetrics,
    auroc,
    bootstrap_auroc,
    choose_designs,
    ece,
    epsilon_from_dev,
    group_split,
    pairwise_accuracy,
    risk_exceedance,
)


def test_auroc_known_values() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


@given(st.lists(st.tuples(st.floats(0, 1), st.sampled_from([0.0, 1.0])), min_size=2, max_size=40))
@settings(max_examples=60, deadline=None)
def test_auroc_matches_pair_counting(rows: list[tuple[float, float]]) -> None:
    s = [r[0] for r in rows]
    y = [r[1] for r in rows]
    pos = [a for a, b in rows if b == 1]
    neg = [a for a, b in rows if b == 0]
    a = auroc(s, y)
    if not pos or not neg:
        assert math.isnan(a)
        return
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert a == pytest.approx(brute / (len(pos) * len(neg)))


def test_bootstrap_interval_contains_point() -> None:
    rng = np.random.default_rng(1)
    groups = [([float(rng.uniform()), float(rng.uniform() + 0.3)], [0.0, 1.0]) for _ in range(30)]
    a, lo, hi = bootstrap_auroc(groups, n_resamples=300)
    assert lo <= a <= hi
    assert 0.5 < a <= 1.0


def _bootstrap_by_loop(
    groups: list[tuple[list[float], list[float]]], n_resamples: int, seed: int
) -> list[float]:
    """The resample AUROCs, built and scored one at a time (the reference)."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(groups), len(groups))
        a = auroc([v for k in pick for v in groups[k][0]], [v for k in pick for v in groups[k][1]])
        if math.isfinite(a):
            stats.append(a)
    return stats


score_with_ties = st.sampled_from([0.0, 0.25, 0.5, 1.0, math.nan, math.inf]) | st.floats(0, 1)


@given(
    st.lists(
        st.lists(st.tuples(score_with_ties, st.sampled_from([0.0, 1.0, 0.5])), max_size=4),
        min_size=1,
        max_size=12,
    ),
    st.integers(0, 40),
    st.integers(0, 3),
)
@settings(max_examples=80, deadline=None)
def test_bootstrap_matches_resampling_one_at_a_time(
    rows: list[list[tuple[float, float]]], n_resamples: int, seed: int
) -> None:
    groups = [([s for s, _ in g], [y for _, y in g]) for g in rows]
    stats = _bootstrap_by_loop(groups, n_resamples, seed)
    a, lo, hi = bootstrap_auroc(groups, n_resamples=n_resamples, seed=seed)
    flat = [v for g in groups for v in g[0]], [v for g in groups for v in g[1]]
    assert a == auroc(*flat) or (math.isnan(a) and math.isnan(auroc(*flat)))
    if not stats:
        assert math.isnan(lo) and math.isnan(hi)
    else:
        alpha = (1.0 - 0.95) / 2.0
        want = np.quantile(stats, [alpha, 1.0 - alpha])
        assert (lo, hi) == (float(want[0]), float(want[1]))


def test_pairwise_accuracy() -> None:
    assert pairwise_accuracy([0.9, 0.1], [1, 0], higher=True) == 1.0
    assert pairwise_accuracy([0.9, 0.1], [1, 0], higher=False) == 0.0
    assert pairwise_accuracy([0.5, 0.5, 0.1], [1, 0, 0], higher=True) == 0.75
    assert math.isnan(pairwise_accuracy([0.2, 0.3], [0, 0], higher=True))


def test_ece_zero_when_calibrated_and_large_when_not() -> None:
    assert ece([0.0, 0.0, 1.0, 1.0], [0, 0, 1, 1]) == 0.0
    assert ece([0.95] * 10, [0] * 10) == pytest.approx(0.95)


@pytest.mark.usefixtures("benchmark_data")
def test_group_split_keeps_a_question_on_one_side() -> None:
    items = load("hhh", subset="harmless")
    dev, test = group_split(items, 0.4, seed=0)
    assert len(dev) + len(test) == len(items)
    assert not {it.question for it in dev} & {it.question for it in test}
    dev2, _ = group_split(list(reversed(items)), 0.4, seed=0)
    assert {it.id for it in dev} == {it.id for it in dev2}


def test_epsilon_is_the_largest_bin_gap() -> None:
    p = [0.1] * 10 + [0.9] * 10
    y = [0] * 10 + [1] * 5 + [0] * 5
    assert epsilon_from_dev(p, y) == pytest.approx(0.4)
    assert epsilon_from_dev([0.5] * 3, [1, 1, 1]) == 0.0  # no bin with 5 readings


def test_epsilon_margin_lowers_true_risk_exceedance() -> None:
    # harm scores understate the truth by 0.1: option 0 scores 0.05, its true risk is 0.15
    groups = [([0.05, 0.5], [1.0, 1.0], [0.15, 0.6]) for _ in range(5)]
    over0, ref0 = risk_exceedance(groups, budget=0.1, epsilon=0.0)
    over1, ref1 = risk_exceedance(groups, budget=0.1, epsilon=0.05)
    assert over0 == 1.0
    assert over1 == 0.0
    assert ref1 >= ref0


def test_choose_designs_uses_dev_only() -> None:
    def res(design: str, dev: float, test: float) -> DesignResult:
        m = SplitMetrics(10, dev, dev, dev, None, 0.1)
        t = SplitMetrics(10, test, test, test, None, 0.1)
        return DesignResult(design, "s", "harm", m, t, 1.0)

    assert choose_designs([res("a", 0.7, 0.5), res("b", 0.6, 0.9)]) == {"harm": "a"}


@pytest.mark.model
@pytest.mark.usefixtures("benchmark_data")
def test_eval_probes_cli_on_smollm2(tmp_path: object) -> None:
    runner = CliRunner()
    args = ["eval", "probes", "--model", "smollm2-135m", "--sources", "hhh-harmless,xstest"]
    args += ["--designs", "plain,pairwise,contrast", "--limit", "3", "--json"]
    export = f"{tmp_path}/reads.jsonl.gz"
    out = runner.invoke(main, [*args, "--cache", f"{tmp_path}/c.sqlite", "--export-reads", export])
    assert out.exit_code == 0, out.output
    assert "exported the" in out.stderr
    rep = json.loads(out.stdout)
    cells = {(r["source"], r["probe"], r["design"]) for r in rep["results"]}
    assert ("hhh-harmless", "harm", "pairwise") in cells
    assert ("hhh-harmless", "harm", "contrast") in cells
    assert ("xstest", "harm", "plain") in cells
    assert ("xstest", "harm", "pairwise") not in cells  # pairwise needs options
    assert ("xstest", "harm", "contrast") not in cells  # nor does a prompt have a reply
    for r in rep["results"]:
        assert r["test"]["n_items"] + r["dev"]["n_items"] >= 1
        assert r["calls_per_reply"] >= 0
    assert rep["model_calls"] > 0
    # what the run read, imported into an empty cache, replays it with no model call
    fresh = f"{tmp_path}/fresh.sqlite"
    imported = runner.invoke(main, ["cache", "import", export, "--cache", fresh])
    assert imported.exit_code == 0, imported.output
    again = runner.invoke(main, [*args, "--cache", fresh])
    assert again.exit_code == 0, again.output
    replay = json.loads(again.stdout)
    assert replay["model_calls"] == 0
    assert [r["test"] for r in replay["results"]] == [r["test"] for r in rep["results"]]
    bad = runner.invoke(main, ["eval", "probes", "--designs", "nope", "--limit", "2"])
    assert bad.exit_code == 2 and "unknown design" in bad.output
