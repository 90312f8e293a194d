"""Exploratory (not a shipped design): can the judge's hidden states tell *harmful* compliance
from *benign* compliance when a head is fitted on exactly that?

Fits a logistic head on complying replies only: harmful = AdvBench targets (the default
recipe's 60) and complying answers to unsafe XSTest *harness-dev* prompts; benign = the
complying first answer to each safe XSTest dev prompt. Refusals are left out. Every feature
comes from the score cache (import resume/xstest.jsonl.gz and resume/heads.jsonl.gz first);
no model is loaded, and a missing reading is an error. Prints, for each (pooling, ridge),
the 3-fold cross-validated AUROC on the training rows (folds by prompt) and the test AUROC
between complying answers to unsafe and to safe XSTest test prompts (the 128 and 41 of
`safetygame scorers evaluate`), then, for the cell cross-validation chooses, the mean
P(harmful) of those two groups and of the policy refusal under the same prompts (which this
head never saw in training); docs/probes.md quotes its output.

    .venv/bin/python scripts/explore_compliance_head.py
"""

from __future__ import annotations

import asyncio
import hashlib
import types

import numpy as np

from safetygame.cache import ScoreCache
from safetygame.eval import head_data as hd
from safetygame.eval.probe_quality import auroc
from safetygame.eval.refusal import matches_refusal_pattern
from safetygame.features import FeatureReader
from safetygame.heads import fit_logistic
from safetygame.models import DEFAULT_MODEL, resolve_model
from safetygame.policy import load_policy

RIDGES = (10.0, 100.0, 1000.0, 10000.0)


def complies(row: hd.Row, refusal: str) -> bool:
    return row.reply != refusal and not matches_refusal_pattern(row.reply)


def main() -> None:
    policy, cache = load_policy(), ScoreCache()
    model_id = resolve_model(DEFAULT_MODEL).model_id
    judge = types.SimpleNamespace(model_id=model_id)  # never called: every read is cached

    def features(rows: list[hd.Row], pooling: str) -> np.ndarray:
        reader = FeatureReader(judge, pooling, cache)  # type: ignore[arg-type]
        return np.stack(
            [asyncio.run(reader.read(r.conversation, r.reply)).vector for r in rows]
        ).astype(np.float64)

    dev, test = hd.xstest_split()
    xs_dev = hd.xstest_rows(dev, policy, cache, model_id, safe_candidates=1)
    rows = [xs_dev.rows[i] for i, _ in xs_dev.points if complies(xs_dev.rows[i], policy.refusal)]
    labels = [y for i, y in xs_dev.points if complies(xs_dev.rows[i], policy.refusal)]
    adv = hd.advbench_rows(hd.Recipe().advbench, policy.refusal)
    rows += [adv.rows[i] for i, y in adv.points if y == 1]
    labels += [1.0] * sum(1 for _, y in adv.points if y == 1)
    y = np.array(labels)

    xs_test = hd.xstest_rows(test, policy, cache, model_id, safe_prompts=False)
    unsafe = [xs_test.rows[a] for a, _ in xs_test.pairs]
    refusals = [xs_test.rows[r] for r in sorted({r for _, r in xs_test.pairs})]
    safe_items = [it for it in test if it.label == "safe"][:60]
    safe_set = hd.xstest_rows(safe_items, policy, cache, model_id, safe_candidates=1)
    safe = [r for r in safe_set.rows if complies(r, policy.refusal)]
    y_test = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]
    print(f"train {len(rows)} replies ({int(y.sum())} harmful); test {len(unsafe)} vs {len(safe)}")

    folds = np.array(
        [int(hashlib.sha256(r.conversation[-1].content.encode()).hexdigest(), 16) % 3 for r in rows]
    )
    best: tuple[float, str, float, float, np.ndarray] | None = None
    for pooling in ("last", "mean"):
        X, XT = features(rows, pooling), features(unsafe + safe + refusals, pooling)
        for ridge in RIDGES:
            cv = []
            for k in range(3):
                fit, held = folds != k, folds == k
                mu, sd = X[fit].mean(0), X[fit].std(0) + 1e-6
                m = fit_logistic((X[fit] - mu) / sd, y[fit], l2=ridge)
                cv.append(auroc(m.logit((X[held] - mu) / sd), y[held]))
            mu, sd = X.mean(0), X.std(0) + 1e-6
            m = fit_logistic((X - mu) / sd, y, l2=ridge)
            p = 1.0 / (1.0 + np.exp(-m.logit((XT - mu) / sd)))
            test_auc = auroc(p[: len(y_test)], y_test)
            cv_auc = float(np.mean(cv))
            print(f"{pooling:4} ridge {ridge:>7g}: cv {cv_auc:.3f}, test AUROC {test_auc:.3f}")
            if best is None or cv_auc > best[0]:
                best = (cv_auc, pooling, ridge, test_auc, p)
    assert best is not None
    p = best[4]
    n_u, n_s = len(unsafe), len(safe)
    print(f"chosen by cv: {best[1]}, ridge {best[2]:g} -> test AUROC {best[3]:.3f}")
    print(
        f"mean P(harmful): unsafe compliance {p[:n_u].mean():.3f}, safe compliance "
        f"{p[n_u : n_u + n_s].mean():.3f}, the policy refusal {p[n_u + n_s :].mean():.3f}"
    )


if __name__ == "__main__":
    main()
