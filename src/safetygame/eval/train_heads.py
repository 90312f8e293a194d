"""Fit learned harm heads (``safetygame scorers train``) and measure them once on test
(``safetygame scorers evaluate``).

**Fitting.** The judge reads every row of the training set (``eval.head_data.training_set``)
once; both poolings come from that one pass. For each objective (``logistic``,
``bradley_terry``, ``gated``), pooling (``last``, ``mean``) and ridge strength in
:data:`RIDGES`, a dev score is computed from training-side data only: the mean of (a) the
pair accuracy on the hh-rlhf *dev* pairs and (b) a 3-fold cross-validated score on the
training rows, folds grouped by conversation (AUROC of a pointwise head on held-out points,
pair accuracy of the Bradley-Terry head on held-out pairs). The best cell (ties: the larger
ridge, the simpler fit) is refitted on all training rows and written as an artefact. Each
cell also records ``cv_compliance``, the cross-validated AUROC among complying replies only
(harmful against benign compliance): the contrast a game needs, reported beside the dev
score to compare designs. No benchmark test item is read while fitting or choosing.

**Measuring.** :func:`evaluate_heads` reads the test sets once: HHH harmless test options
(the ``eval probes`` split) and XSTest harness-test complying answers against the policy
refusal. It reports pair accuracy and AUROC with 95% bootstrap intervals (whole questions
resampled), ECE after a Platt fit on HHH harmless dev options, and the reading cost.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit
from tqdm import tqdm

from safetygame.backends.base import Backend
from safetygame.cache import ScoreCache
from safetygame.errors import BackendUnsupported, ConfigError
from safetygame.eval import head_data as hd
from safetygame.eval.datasets import benchmark_dir
from safetygame.eval.probe_quality import (
    SOURCES,
    auroc,
    bootstrap_auroc,
    ece,
    group_split,
    pairwise_accuracy,
)
from safetygame.eval.refusal import matches_refusal_pattern
from safetygame.features import FeatureReader, MiniLMReader, reader_for
from safetygame.heads import FeatureSpec, Head, HeadParams, Objective, fit_head
from safetygame.policy import Policy
from safetygame.probes import Scorer, read
from safetygame.scorers import build_scorer, fit_platt

__all__ = ["RIDGES", "evaluate_heads", "read_features", "train_heads"]

FloatArray = NDArray[np.float64]
RIDGES = (1.0, 10.0, 100.0, 1000.0)
OBJECTIVES: tuple[Objective, ...] = ("logistic", "bradley_terry", "gated")
POOLINGS = ("last", "mean")


FeatureSource = Literal["judge", "minilm"]


def feature_readers(
    source: FeatureSource, backend: Backend, cache: ScoreCache | None
) -> list[FeatureReader | MiniLMReader]:
    """The readers of one feature set: the judge's hidden states in both poolings, or the
    independent MiniLM embeddings."""
    if source == "minilm":
        return [MiniLMReader(cache)]
    if source != "judge":
        raise ConfigError(f"features must be 'judge' or 'minilm', not {source!r}")
    return [FeatureReader(backend, pooling, cache) for pooling in POOLINGS]


async def read_features(
    readers: Sequence[FeatureReader | MiniLMReader],
    rows: Sequence[hd.Row],
    *,
    progress: bool = True,
    desc: str = "judge reads",
) -> dict[str, FloatArray]:
    """pooling -> (n, dim) features; a pooling the backend does not give is left out.

    The first judge pooling reads the model (both poolings are cached from that pass); the
    second comes from the cache."""
    out: dict[str, FloatArray] = {}
    pairs = [(r.conversation, r.reply) for r in rows]
    bar = tqdm(total=len(rows), desc=desc, unit="reply", disable=not progress)
    try:
        for k, reader in enumerate(readers):
            try:
                out[reader.pooling] = await reader.matrix(
                    pairs, concurrency=1, progress=bar if k == 0 else None
                )
            except BackendUnsupported:
                continue  # an embeddings server gives one pooling only
    finally:
        bar.close()
    if not out:
        raise BackendUnsupported("the feature source gives no pooled features")
    return out


def _fold(conv_text: str, k: int = 3) -> int:
    return int(hashlib.sha256(f"fold\x00{conv_text}".encode()).hexdigest(), 16) % k


def _pair_acc(z: FloatArray, pairs: Sequence[tuple[int, int]]) -> float:
    if not pairs:
        return float("nan")
    d = np.array([z[a] - z[b] for a, b in pairs])
    return float(np.mean(np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))))


def complies(row: hd.Row, refusal: str) -> bool:
    """The refusal pattern detector's reading of a reply (the gated head's gate label)."""
    return row.reply != refusal and not matches_refusal_pattern(row.reply)


def _fit(
    X: FloatArray,
    train: hd.LabelledSet,
    objective: Objective,
    ridge: float,
    refusal: str,
    keep: NDArray[np.bool_] | None = None,
) -> HeadParams:
    """Fit ``objective`` on the training labels of the rows in ``keep`` (all by default).
    A gated head's gate learns complies-vs-not on every labelled row; its content map learns
    the harm label on the complying ones."""
    ok = np.ones(len(train.rows), dtype=bool) if keep is None else keep
    points = [(i, y) for i, y in train.points if ok[i]]
    pairs = [(a, b) for a, b in train.pairs if ok[a]]
    if objective != "gated":
        return fit_head(X, objective=objective, ridge=ridge, points=points, pairs=pairs)
    labelled = sorted({i for i, _ in points} | {i for p in pairs for i in p})
    gate = [(i, 1.0 if complies(train.rows[i], refusal) else 0.0) for i in labelled]
    content = [(i, y) for i, y in points if complies(train.rows[i], refusal)]
    return fit_head(X, objective="gated", ridge=ridge, points=content, gate_points=gate)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _cv_scores(
    X: FloatArray, train: hd.LabelledSet, objective: Objective, ridge: float, refusal: str
) -> tuple[float, float]:
    """3-fold cross-validated (score, compliance score) on the training rows.

    The score is the objective's own: held-out AUROC of the harm label for the pointwise
    heads, held-out pair accuracy for Bradley-Terry. The compliance score, for every
    objective, is the held-out AUROC among *complying* labelled replies only: harmful
    against benign compliance, the contrast the game needs to answer safe prompts and refuse
    unsafe ones (a refusal-vs-compliance score can be near 1 without it)."""
    # a conversation's rows stay in one fold; a text with no conversation is its own group
    folds = np.array(
        [_fold(r.conversation[-1].content if r.conversation else r.reply) for r in train.rows]
    )
    scores, comply_scores = [], []
    for k in range(3):
        held = [(i, y) for i, y in train.points if folds[i] == k]
        if objective == "bradley_terry":
            held_pairs = [(a, b) for a, b in train.pairs if folds[a] == k]
            if not held_pairs or all(folds[a] == k for a, _ in train.pairs):
                continue
        elif (
            len({y for i, y in train.points if folds[i] != k}) < 2 or len({y for _, y in held}) < 2
        ):
            continue
        try:
            z = _fit(X, train, objective, ridge, refusal, folds != k).logit(X)
        except ConfigError:
            continue  # a gated fold with one class of complying replies cannot be fitted
        if objective == "bradley_terry":
            scores.append(_pair_acc(z, held_pairs))
        else:
            scores.append(auroc([z[i] for i, _ in held], [y for _, y in held]))
        held_c = [(i, y) for i, y in held if complies(train.rows[i], refusal)]
        if len({y for _, y in held_c}) == 2:
            comply_scores.append(auroc([z[i] for i, _ in held_c], [y for _, y in held_c]))
    return _mean(scores), _mean(comply_scores)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class TrainResult:
    heads: tuple[Head, ...]
    grid: tuple[dict[str, Any], ...]
    notes: dict[str, int]
    n_rows: int
    seconds: float


async def train_heads(
    backend: Backend,
    policy: Policy,
    cache: ScoreCache,
    recipe: hd.Recipe,
    *,
    xstest_limit: int | None = None,
    features: FeatureSource = "judge",
    progress: bool = True,
) -> TrainResult:
    """Fit one head per objective, chosen on dev (module doc); nothing is written.
    ``features``: the judge's own hidden states, or the independent MiniLM set."""
    t0 = time.perf_counter()
    train, dev = hd.training_set(recipe, policy, cache, backend.model_id, xstest_limit=xstest_limit)
    if not train.pairs or len({y for _, y in train.points}) < 2:
        raise ConfigError(
            "the training set has no preference pairs or only one class of labels: the score "
            "cache lacks the XSTest candidates (safetygame cache import resume/xstest.jsonl.gz) "
            "or the recipe is too small"
        )
    readers = feature_readers(features, backend, cache)
    feats = await read_features(readers, train.rows + dev.rows, progress=progress)
    n = len(train.rows)
    grid: list[dict[str, Any]] = []
    for pooling, F in feats.items():
        X, Xdev = F[:n], F[n:]
        dev_pairs = [(a + n, b + n) for a, b in dev.pairs]
        for objective in OBJECTIVES:
            for ridge in RIDGES:
                params = _fit(X, train, objective, ridge, policy.refusal)
                hh = _pair_acc(params.logit(np.concatenate([X, Xdev])), dev_pairs)
                cv, cv_comply = _cv_scores(X, train, objective, ridge, policy.refusal)
                grid.append(
                    {
                        "objective": objective,
                        "pooling": pooling,
                        "ridge": ridge,
                        "hh_dev_pair_acc": hh,
                        "cv": cv,
                        "cv_compliance": cv_comply,
                        "dev_score": float(np.nanmean([hh, cv])),
                    }
                )
    provenance = {
        "recipe": asdict(recipe),
        "xstest_limit": xstest_limit,
        "rows": n,
        "points": len(train.points),
        "pairs": len(train.pairs),
        "notes": train.notes | dev.notes,
        "data_sha256": {
            f"{bench}/{name}": _sha256(benchmark_dir(bench) / name)
            for bench, name in (
                ("hh-rlhf", "harmless-base-test.jsonl.gz"),
                ("advbench", "harmful_behaviors.csv"),
                ("xstest", "xstest_prompts.csv"),
                *([("openai-moderation", "samples-1680.jsonl.gz")] if recipe.moderation else []),
            )
        },
        "policy_refusal_sha256": hashlib.sha256(policy.refusal.encode()).hexdigest(),
        "ridges": list(RIDGES),
    }
    by_pooling = {r.pooling: r for r in readers}
    model_name = readers[0].model_id.split("@", 1)[0]
    heads = []
    for objective in OBJECTIVES:
        cells = [g for g in grid if g["objective"] == objective]
        best = max(cells, key=lambda g: (round(g["dev_score"], 6), g["ridge"]))
        F = feats[best["pooling"]][:n]
        p = _fit(F, train, objective, best["ridge"], policy.refusal)
        short = {"bradley_terry": "bt"}.get(objective, objective)
        reader = by_pooling[best["pooling"]]
        heads.append(
            Head(
                name=f"{model_name}-harm-{short}",
                kind="harm",
                objective=objective,
                features=FeatureSpec(
                    model_id=reader.model_id,
                    model_sha256=reader.model_sha256 or "unknown",
                    pooling=best["pooling"],
                    prompt=reader.prompt,
                    dim=int(F.shape[1]),
                ),
                params=p,
                ridge=float(best["ridge"]),
                training=provenance,
                quality={"dev": best},
            )
        )
    return TrainResult(
        tuple(heads), tuple(grid), train.notes | dev.notes, n, time.perf_counter() - t0
    )


# --------------------------------------------------------------------------- test report


def _metrics(
    groups: list[tuple[list[float], list[float]]], platt_dev: tuple[list[float], list[float]]
) -> dict[str, Any]:
    a, lo, hi = bootstrap_auroc(groups, n_resamples=1000, seed=0)
    accs = [pairwise_accuracy(s, y, higher=True) for s, y in groups]
    accs = [x for x in accs if np.isfinite(x)]
    rng = np.random.default_rng(0)
    boots = (
        [float(np.mean(rng.choice(accs, len(accs), replace=True))) for _ in range(1000)]
        if accs
        else []
    )
    flat_s = [v for s, _ in groups for v in s]
    flat_y = [v for _, y in groups for v in y]
    ece_platt = None
    if platt_dev[0] and len(set(platt_dev[1])) == 2:
        cal = fit_platt(expit(np.array(platt_dev[0])), platt_dev[1])
        ece_platt = ece(cal.apply(expit(np.array(flat_s))), flat_y)
    return {
        "n_groups": len(groups),
        "n_replies": len(flat_s),
        "auroc": a,
        "auroc_ci": [lo, hi],
        "pair_acc": float(np.mean(accs)) if accs else None,
        "pair_acc_ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
        if boots
        else None,
        "ece_platt_dev": ece_platt,
    }


async def evaluate_heads(
    backend: Backend,
    heads: Sequence[Head],
    policy: Policy,
    cache: ScoreCache,
    *,
    xstest_limit: int | None = None,
    safe_limit: int | None = 60,
    designs: Sequence[str] = (),
    timing: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Test-set quality of each head (module doc); reads each test reply once.
    ``safe_limit``: safe XSTest test prompts whose complying answer is read (cost).
    ``timing``: XSTest replies read again, one at a time and past the cache, for each
    scorer's ms per read (what a decision pays; the quality reads may all be cache hits)."""
    hhh = SOURCES["hhh-harmless"].load()
    hhh_dev, hhh_test = group_split(hhh, 0.4, 0)
    dev_set, dev_groups = hd.hhh_harmless_rows(hhh_dev)
    test_set, test_groups = hd.hhh_harmless_rows(hhh_test)
    _, xs_test = hd.xstest_split()
    if xstest_limit is not None:
        xs_test = xs_test[:xstest_limit]
    xs = hd.xstest_rows(xs_test, policy, cache, backend.model_id, safe_prompts=False)
    used = sorted({i for pair in xs.pairs for i in pair})
    # complying answers to safe prompts (the first candidate of each, when it complies): what
    # the game must *not* read as harmful if it is to answer safe prompts
    safe_items = [it for it in xs_test if it.label == "safe"][:safe_limit]
    safe = hd.xstest_rows(safe_items, policy, cache, backend.model_id, safe_candidates=1)
    safe_rows = [
        r for r in safe.rows if r.reply != policy.refusal and not matches_refusal_pattern(r.reply)
    ]
    xs_rows = [xs.rows[i] for i in used] + safe_rows
    pos = {i: k for k, i in enumerate(used)}
    rows = dev_set.rows + test_set.rows + xs_rows
    misses0 = cache.misses
    t0 = time.perf_counter()
    feats: dict[tuple[str, str], FloatArray] = {}
    for head in heads:
        key = (head.features.model_id, head.features.pooling)
        if key not in feats:
            reader = reader_for(head.features, backend, cache)
            got = await read_features([reader], rows, progress=progress, desc="test reads")
            feats[key] = got[head.features.pooling]
    seconds = time.perf_counter() - t0
    ms_per_read: dict[str, float | None] = {}
    for spec in {h.features.model_id: h.features for h in heads}.values():
        uncached = reader_for(spec, backend, None)

        async def read_uncached(r: hd.Row, u: FeatureReader | MiniLMReader = uncached) -> object:
            return await u.read(r.conversation, r.reply)

        ms_per_read[spec.model_id] = await _ms_per_read(read_uncached, xs_rows[:timing])
    n_dev, n_test = len(dev_set.rows), len(test_set.rows)
    n_unsafe = len(used)

    def xstest_metrics(zx: FloatArray) -> dict[str, Any]:
        """Complying answers to unsafe prompts against the refusal (per prompt), and against
        complying answers to safe prompts; ``zx`` is one score per XSTest row."""
        by_prompt: dict[tuple[Any, ...], tuple[list[float], list[float]]] = {}
        for a, r in xs.pairs:
            conv = xs.rows[a].conversation
            s, y = by_prompt.setdefault(conv, ([float(zx[pos[r]])], [0.0]))
            s.append(float(zx[pos[a]]))
            y.append(1.0)
        xs_groups = list(by_prompt.values())
        harm_vs_benign = [(sc[1:], ys[1:]) for sc, ys in xs_groups] + [
            ([float(zx[n_unsafe + k])], [0.0]) for k in range(len(safe_rows))
        ]
        return {
            "xstest_complying_vs_refusal": _metrics(xs_groups, ([], [])),
            "xstest_pairs_above_refusal": _pair_acc(
                np.asarray(zx), [(pos[a], pos[r]) for a, r in xs.pairs]
            ),
            "xstest_unsafe_vs_safe_compliance": _metrics(harm_vs_benign, ([], [])),
        }

    report: dict[str, Any] = {
        "model_id": backend.model_id,
        "hhh_harmless": {"dev_items": len(hhh_dev), "test_items": len(hhh_test)},
        "xstest": {
            "test_prompts": len(xs_test),
            "complying": len(xs.pairs),
            "safe_complying": len(safe_rows),
        },
        "read_seconds": seconds,
        "cache_misses": cache.misses - misses0,
        "ms_per_read": ms_per_read,
        "heads": {},
        "designs": {},
    }
    for head in heads:
        z = head.logit(feats[(head.features.model_id, head.features.pooling)])
        zd, zt, zx = z[:n_dev], z[n_dev : n_dev + n_test], z[n_dev + n_test :]
        dev_scored = [([float(zd[i]) for i, _ in g], [y for _, y in g]) for g in dev_groups]
        platt = ([v for s, _ in dev_scored for v in s], [v for _, y in dev_scored for v in y])
        hhh_groups = [([float(zt[i]) for i, _ in g], [y for _, y in g]) for g in test_groups]
        report["heads"][head.name] = {
            "features": head.features.model_id,
            "objective": head.objective,
            "pooling": head.features.pooling,
            "hhh_harmless_dev": _metrics(dev_scored, ([], [])),
            "hhh_harmless_test": _metrics(hhh_groups, platt),
            **xstest_metrics(zx),
        }
    # yes/no designs on the same XSTest replies, for comparison (their readings of these
    # replies are in the committed XSTest cache: `eval xstest` scored every candidate)
    for name in designs:
        scorer = build_scorer(name, backend, policy, cache, kind="harm")
        q = policy.probes.harm.question
        readings = [await read(scorer, r.conversation, r.reply, q, policy.refusal) for r in xs_rows]
        failed = [x.error for x in readings if x.value is None]
        if failed:
            report["designs"][name] = {"error": f"{len(failed)} readings failed: {failed[0]}"}
            continue
        values = np.array([float(x.value or 0.0) for x in readings])
        fresh = build_scorer(name, backend, policy, ScoreCache(None), kind="harm")

        async def read_fresh(r: hd.Row, s: Scorer = fresh, q: str = q) -> object:
            return await read(s, r.conversation, r.reply, q, policy.refusal)

        ms = await _ms_per_read(read_fresh, xs_rows[:timing])
        report["designs"][name] = {**xstest_metrics(values), "ms_per_read": ms}
    return report


async def _ms_per_read(
    read_one: Callable[[hd.Row], Awaitable[object]], rows: Sequence[hd.Row]
) -> float | None:
    """Mean wall time of reading ``rows`` one at a time (no cache), in ms; None for none."""
    if not rows:
        return None
    t0 = time.perf_counter()
    for r in rows:
        await read_one(r)
    return 1000 * (time.perf_counter() - t0) / len(rows)
