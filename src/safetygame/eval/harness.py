"""The multiple-choice evaluation harness: scores -> ScoreTable -> tune on dev -> report on test.

A run is: load a benchmark, take a seeded sub-sample (``limit``), split it into a dev and a
test part by hashing item ids (:func:`dev_test_split`), score every option once through the
cache (:class:`~safetygame.eval.scoring.ScoringPass`), build one :class:`ScoreTable`, tune
the budget T (and beta) of the tunable methods on the dev rows only, and report every
method on the test rows with bootstrap intervals and paired comparisons. Everything after the
scoring pass is pure computation on cached numbers (:func:`evaluate_mc`), so it is tested with
hand-built :class:`ItemScores`.

Results are kept in a versioned :class:`EvalLog` (JSON), the input of ``safetygame eval
report``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from safetygame._json import to_jsonable
from safetygame.backends.base import Backend
from safetygame.cache import ScoreCache
from safetygame.errors import ConfigError
from safetygame.eval import datasets
from safetygame.eval.datasets import MCItem, PromptItem, Split
from safetygame.eval.methods import (
    METHODS,
    MethodParams,
    ScoreTable,
    argmax_accuracy,
    expected_accuracy,
    expected_extra_risk,
    refusal_rate,
    run_method,
)
from safetygame.eval.scoring import ItemScores, RunTally, ScoringPass
from safetygame.eval.stats import Candidate, bootstrap_ci, paired_bootstrap, tune_budget
from safetygame.policy import GameSettings, Policy

__all__ = [
    "BUDGET_GRID",
    "EVAL_LOG_VERSION",
    "MC_BENCHMARKS",
    "OPEN_BENCHMARKS",
    "SAFETY_GAMES",
    "TUNED_METHODS",
    "EvalConfig",
    "EvalLog",
    "current_candidate",
    "dev_test_split",
    "evaluate_mc",
    "expected_helpfulness",
    "load_items",
    "read_eval_log",
    "run_mc",
    "sample_and_split",
    "score_table",
    "write_eval_log",
]

FloatArray = NDArray[np.float64]
ItemT = TypeVar("ItemT", MCItem, PromptItem)

EVAL_LOG_VERSION = 1
LOG_NAME = "evallog.json"

#: Multiple-choice benchmarks and the loader arguments used for them.
MC_BENCHMARKS: Mapping[str, Mapping[str, str]] = {
    "hhh": {},
    "truthfulqa": {"split": "mc1"},
    "safetybench": {"split": "zh_subset"},
}
#: Open-ended (prompt-only) benchmarks: the refusal study (:mod:`safetygame.eval.refusal`).
OPEN_BENCHMARKS: tuple[str, ...] = ("xstest", "harmbench", "advbench")

#: Budgets tried when tuning T on the dev split.
BUDGET_GRID: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
#: beta values tried for the Safety Game (None = the hard LP).
BETA_GRID: tuple[float | None, ...] = (None, 1.0, 10.0)
#: Methods with a budget, and the betas each one is tuned over.
TUNED_METHODS: Mapping[str, tuple[float | None, ...]] = {
    "safety-game": BETA_GRID,
    "safety-game-baseline": BETA_GRID,
    "filter": (None,),
    "safety-game-pooled": (None,),
}
SAFETY_GAMES: tuple[str, ...] = ("safety-game", "safety-game-baseline")


@dataclass(frozen=True)
class EvalConfig:
    """Everything that fixes a run's numbers (besides the model and the policy)."""

    benchmark: str
    seed: int = 0
    limit: int | None = None
    dev_fraction: float = 0.2
    budgets: tuple[float, ...] = BUDGET_GRID
    n_resamples: int = 2000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 2:
            raise ConfigError("limit must be >= 2 (one dev and one test item at least)")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ConfigError("dev_fraction must be in (0, 1)")
        if not self.budgets or any(not (math.isfinite(b) and b >= 0) for b in self.budgets):
            raise ConfigError("budgets must be a non-empty list of finite numbers >= 0")


def current_candidate(game: GameSettings, method: str) -> Candidate:
    """The (T, beta) a policy's ``game`` plays now, as ``method`` reads it: a method tuned
    without a beta (the filter, the pooled game) keeps the policy's T with the hard budget.
    The tuning rule starts from it (:func:`~safetygame.eval.stats.choose_budget`)."""
    betas = TUNED_METHODS.get(method, (None,))
    return (game.budget, game.beta if betas != (None,) else None)


# --------------------------------------------------------------------------- items & splits


def load_items(benchmark: str, seed: int, limit: int | None) -> list[MCItem]:
    """A multiple-choice benchmark, sub-sampled to ``limit`` items by hashing ids with ``seed``."""
    if benchmark not in MC_BENCHMARKS:
        raise ConfigError(
            f"benchmark must be one of {', '.join(MC_BENCHMARKS)} for multiple choice, "
            f"not {benchmark!r}"
        )
    items = datasets.load(benchmark, **MC_BENCHMARKS[benchmark])
    assert all(isinstance(it, MCItem) for it in items)
    mc = [it for it in items if isinstance(it, MCItem)]
    return mc if limit is None else datasets.subsample(mc, limit, seed)


def dev_test_split(items: Sequence[ItemT], dev_fraction: float, seed: int) -> Split[ItemT]:
    """Hash split (an item is dev iff hash(seed, id) < dev_fraction); never empty on either side.

    When the hash split leaves one side empty (tiny samples) it falls back to the
    ``round(dev_fraction * n)`` items (at least 1, at most n - 1) with the smallest hashes.
    """
    if len(items) < 2:
        raise ConfigError(f"need at least 2 items for a dev/test split, got {len(items)}")
    out = datasets.split(items, dev_fraction, seed=seed)
    if out.dev and out.test:
        return out
    k = min(len(items) - 1, max(1, round(dev_fraction * len(items))))
    return datasets.split(items, n_dev=k, seed=seed)


def sample_and_split(items: Sequence[ItemT], cfg: EvalConfig) -> Split[ItemT]:
    """``cfg.limit`` seeded items (all when None), then :func:`dev_test_split`."""
    if cfg.limit is not None:
        items = datasets.subsample(items, cfg.limit, cfg.seed)
    return dev_test_split(items, cfg.dev_fraction, cfg.seed)


# --------------------------------------------------------------------------- score table


def score_table(
    items: Sequence[MCItem], scores: Sequence[ItemScores]
) -> tuple[ScoreTable, tuple[str, ...]]:
    """The table of the items scored without error, and the ids of those left out.

    ``loglik`` is length-normalised (sum / tokens); the last probe reading of each
    :class:`ItemScores` is the refusal's and becomes ``refusal_helpful`` / ``refusal_harm``.
    """
    by_id = {s.item_id: s for s in scores}
    rows: list[tuple[MCItem, ItemScores]] = []
    failed: list[str] = []
    for it in items:
        s = by_id.get(it.id)
        if s is None:
            raise ConfigError(f"no scores for item {it.id}")
        m = len(it.options)
        if s.n_options != m or not len(s.helpfulness) == len(s.harm) == m + 1:
            raise ConfigError(
                f"item {it.id}: {m} options but {s.n_options} log-likelihoods and "
                f"{len(s.helpfulness)}/{len(s.harm)} probe readings (options + refusal)"
            )
        usable = (
            s.ok
            and all(math.isfinite(x) for x in (*s.loglik, *s.helpfulness, *s.harm))
            and all(n > 0 for n in s.n_tokens)
        )
        if usable:
            rows.append((it, s))
        else:
            failed.append(it.id)
    if not rows:
        first = next((e for sc in scores for e in sc.errors), "non-finite readings")
        raise ConfigError(f"no item was scored without errors (first error: {first})")
    table = ScoreTable.from_ragged(
        loglik=[[lp / n for lp, n in zip(s.loglik, s.n_tokens, strict=True)] for _, s in rows],
        helpful=[s.helpfulness[:-1] for _, s in rows],
        harm=[s.harm[:-1] for _, s in rows],
        correct=[it.labels for it, _ in rows],
        ids=tuple(it.id for it, _ in rows),
        refusal_helpful=np.array([s.helpfulness[-1] for _, s in rows]),
        refusal_harm=np.array([s.harm[-1] for _, s in rows]),
        categories=tuple(it.category for it, _ in rows),
    )
    return table, tuple(failed)


def expected_helpfulness(strategy: FloatArray, table: ScoreTable) -> FloatArray:
    """Per item: sum_i pi_i h_i, the refusal column scoring the refusal's helpfulness."""
    h_s, _ = table.refusal_scores()
    m = table.n_options
    out: FloatArray = (strategy[:, :m] * table.helpful).sum(axis=1) + strategy[:, m] * h_s
    return out


# --------------------------------------------------------------------------- evaluation


def _ci(values: FloatArray, cfg: EvalConfig, seed: int) -> tuple[float, list[float]]:
    iv = bootstrap_ci(values, n_resamples=cfg.n_resamples, confidence=cfg.confidence, seed=seed)
    return iv.mean, [iv.low, iv.high]


def evaluate_mc(
    table: ScoreTable,
    dev_ids: Sequence[str],
    test_ids: Sequence[str],
    cfg: EvalConfig,
    methods: Sequence[str] | None = None,
    current: Mapping[str, Candidate] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, FloatArray]]:
    """Tune on ``dev_ids``, report on ``test_ids``.

    Tuning follows :func:`~safetygame.eval.stats.choose_budget`: each budgeted method keeps
    its ``current`` (T, beta) (the policy's, :func:`current_candidate`; by default the policy
    file's default game settings) unless the dev evidence separates the dev-best grid point.

    Returns (summary, curves, strategies): the summary has ``methods`` (per method: expected
    and argmax accuracy with intervals, refusal rate, extra risk, helpfulness, params),
    ``paired`` (each Safety Game against each other method, expected accuracy) and ``tuned``;
    ``curves`` holds test-set metrics of the budgeted methods over the T grid (hard budget,
    descriptive: the reported point is the dev-tuned one); ``strategies`` the test strategy of
    every method (rows in ``test_ids`` order).
    """
    overlap = set(dev_ids) & set(test_ids)
    if overlap:
        raise ConfigError(f"dev and test share {len(overlap)} item(s), e.g. {sorted(overlap)[0]}")
    if not dev_ids or not test_ids:
        raise ConfigError("both the dev and the test split need at least one scored item")
    names = list(methods or METHODS)
    dev = table.take_ids(list(dev_ids))
    test = table.take_ids(list(test_ids))
    tuned: dict[str, dict[str, Any]] = {}
    params: dict[str, MethodParams] = {}
    for name in names:
        if name in TUNED_METHODS:
            cur = (current or {}).get(name) or current_candidate(GameSettings(), name)
            res = tune_budget(
                dev,
                name,
                cfg.budgets,
                current=cur,
                betas=TUNED_METHODS[name],
                n_resamples=cfg.n_resamples,
                confidence=cfg.confidence,
                seed=cfg.seed,
            )
            tuned[name] = {**res.summary(), "dev_acc": res.score}
            params[name] = MethodParams(budget=res.budget, beta=res.beta)
        else:
            params[name] = MethodParams()
    strategies = {name: run_method(name, test, params[name]) for name in names}
    acc = {name: expected_accuracy(s, test) for name, s in strategies.items()}
    out_methods: dict[str, Any] = {}
    for k, name in enumerate(names):
        s = strategies[name]
        a, a_ci = _ci(acc[name], cfg, cfg.seed + k)
        b, b_ci = _ci(argmax_accuracy(s, test), cfg, cfg.seed + k)
        out_methods[name] = {
            "acc": a,
            "ci": a_ci,
            "argmax_acc": b,
            "argmax_ci": b_ci,
            "refusal_rate": float(refusal_rate(s).mean()),
            "extra_risk": float(expected_extra_risk(s, test).mean()),
            "helpfulness": float(expected_helpfulness(s, test).mean()),
            "budget": params[name].budget if name in TUNED_METHODS else None,
            "beta": params[name].beta,
        }
    paired: dict[str, Any] = {}
    for game_name in (g for g in SAFETY_GAMES if g in names):
        paired[game_name] = {}
        for other in names:
            if other == game_name:
                continue
            d = paired_bootstrap(
                acc[game_name],
                acc[other],
                n_resamples=cfg.n_resamples,
                confidence=cfg.confidence,
                seed=cfg.seed,
            )
            paired[game_name][other] = {
                "diff": d.diff,
                "ci": [d.low, d.high],
                "p_value": d.p_value,
            }
    curves = budget_curves(test, cfg.budgets, [n for n in names if n in TUNED_METHODS])
    summary = {
        "n": test.n_items,
        "n_dev": dev.n_items,
        "methods": out_methods,
        "paired": paired,
        "tuned": tuned,
    }
    return summary, curves, strategies


def budget_curves(
    table: ScoreTable, budgets: Sequence[float], methods: Sequence[str]
) -> dict[str, Any]:
    """Per method and T (hard budget): accuracy, extra risk, helpfulness, refusal rate."""
    out: dict[str, Any] = {"budgets": [float(b) for b in budgets]}
    for name in methods:
        rows: dict[str, list[float]] = {
            "acc": [],
            "extra_risk": [],
            "helpfulness": [],
            "refusal_rate": [],
        }
        for T in budgets:
            s = run_method(name, table, MethodParams(budget=float(T)))
            rows["acc"].append(float(expected_accuracy(s, table).mean()))
            rows["extra_risk"].append(float(expected_extra_risk(s, table).mean()))
            rows["helpfulness"].append(float(expected_helpfulness(s, table).mean()))
            rows["refusal_rate"].append(float(refusal_rate(s).mean()))
        out[name] = rows
    return out


# --------------------------------------------------------------------------- the log

Status = Literal["started", "success", "error", "cancelled"]


@dataclass(frozen=True)
class EvalLog:
    """One run of one benchmark, as saved to ``<out>/evallog.json``.

    ``kind`` is ``mc`` or ``open``; ``results`` is what ``--json`` prints; ``curves`` the
    metrics over the T grid (for plots); ``items`` the per-item record (scores and
    strategies); ``stats`` timings, cache hits and model calls.
    """

    benchmark: str
    kind: Literal["mc", "open"]
    status: Status
    config: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    version: int = EVAL_LOG_VERSION
    created: float = field(default_factory=time.time)


def write_eval_log(log: EvalLog, path: str | Path) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a log."""
    p = Path(path)
    if p.suffix != ".json":
        p = p / LOG_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(log), indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(p)
    return p


def read_eval_log(path: str | Path) -> EvalLog:
    p = Path(path)
    if p.is_dir():
        p = p / LOG_NAME
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read eval log {p}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != EVAL_LOG_VERSION:
        raise ConfigError(f"{p} is not an eval log of version {EVAL_LOG_VERSION}")
    known = set(EvalLog.__dataclass_fields__)
    try:
        return EvalLog(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise ConfigError(f"{p} is not a valid eval log ({exc})") from exc


def item_records(
    items: Sequence[MCItem],
    scores: Sequence[ItemScores],
    split_of: Mapping[str, str],
    test_ids: Sequence[str],
    strategies: Mapping[str, FloatArray],
) -> list[dict[str, Any]]:
    """Per item: split, labels, raw scores and (test items) each method's strategy."""
    by_id = {s.item_id: s for s in scores}
    row = {k: i for i, k in enumerate(test_ids)}
    out = []
    for it in items:
        s = by_id[it.id]
        rec: dict[str, Any] = {
            "id": it.id,
            "split": split_of[it.id],
            "category": it.category,
            "labels": list(it.labels),
            "loglik": list(s.loglik),
            "n_tokens": list(s.n_tokens),
            "helpfulness": list(s.helpfulness),
            "harm": list(s.harm),
            "errors": list(s.errors),
        }
        if it.id in row:
            m = len(it.options)
            rec["strategies"] = {
                name: [*st[row[it.id], :m].tolist(), float(st[row[it.id], -1])]
                for name, st in strategies.items()
            }
        out.append(rec)
    return out


# --------------------------------------------------------------------------- running


async def run_mc(
    backend: Backend,
    policy: Policy,
    cfg: EvalConfig,
    cache: ScoreCache | None,
    *,
    progress: bool = True,
    tally: RunTally | None = None,
    items: Sequence[MCItem] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Score a multiple-choice benchmark (cached), then evaluate every method.

    Returns (summary, curves, per-item records); see :func:`evaluate_mc`. ``tally`` follows
    the scoring pass (what an interrupted run finished). ``items`` replaces the benchmark's
    (``eval custom``); ``cfg.limit`` sub-samples them the same way.
    """
    if items is None:
        items = load_items(cfg.benchmark, cfg.seed, cfg.limit)
    elif cfg.limit is not None:
        items = datasets.subsample(items, cfg.limit, cfg.seed)
    sp = dev_test_split(items, cfg.dev_fraction, cfg.seed)
    # Nested-sample order: an interrupted --limit 500 run has finished a smaller sample.
    order = datasets.sample_order(items, cfg.seed)
    scores = await ScoringPass(backend, policy, cache).run(
        items, progress=progress, order=order, tally=tally
    )
    table, failed = score_table(items, scores)
    kept = set(table.ids)
    dev_ids = [it.id for it in sp.dev if it.id in kept]
    test_ids = [it.id for it in sp.test if it.id in kept]
    current = {name: current_candidate(policy.game, name) for name in TUNED_METHODS}
    summary, curves, strategies = evaluate_mc(table, dev_ids, test_ids, cfg, current=current)
    summary = {**summary, "n_failed": len(failed), "failed_ids": list(failed)}
    split_of = {it.id: "dev" for it in sp.dev} | {it.id: "test" for it in sp.test}
    records = item_records(items, scores, split_of, test_ids, strategies)
    return summary, curves, records
