"""How well harm scorers separate complying answers to unsafe XSTest prompts from complying
answers to safe ones, read as the game reads them: Delta = d(answer) - d(refusal), per prompt.

`safetygame scorers evaluate` reports the raw readings' separation; the game only sees the
margin over the refusal, whose own reading moves with the prompt. From the score cache alone
(no judge call; import resume/xstest.jsonl.gz first; a MiniLM head runs MiniLM locally, the
embed extra), over every cached candidate the refusal patterns do not flag; intervals
resample prompts.

    python scripts/margin_separation.py                      # test split, self vs MiniLM gated
    python scripts/margin_separation.py --split dev --budgets 0.1,0.2,0.3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np

from safetygame.cache import ScoreCache
from safetygame.errors import ConfigError
from safetygame.eval.head_data import xstest_candidates, xstest_split
from safetygame.eval.probe_quality import bootstrap_auroc
from safetygame.eval.refusal import matches_refusal_pattern, prompt_chat
from safetygame.eval.scoring import CacheOnlyBackend, CachingBackend
from safetygame.models import DEFAULT_MODEL
from safetygame.policy import load_policy
from safetygame.scorers import build_scorer

Groups = list[tuple[list[float], list[float]]]


async def separation(name: str, split: str, policy_name: str, budgets: list[float]) -> dict:
    policy = load_policy(policy_name)
    cache = ScoreCache()
    backend = CachingBackend(CacheOnlyBackend.for_model(DEFAULT_MODEL), cache)
    scorer = build_scorer(name, backend, policy, cache, kind="harm")
    question = policy.probes.harm.question
    dev, test = xstest_split()
    margins: Groups = []
    raw: Groups = []
    misses = 0
    refusal_reads: dict[float, list[float]] = {0.0: [], 1.0: []}
    for item in dev if split == "dev" else test:
        texts = xstest_candidates(item, policy, cache, backend.model_id)
        if not texts:
            continue
        chat = prompt_chat(item)
        refusal = await scorer.score(chat, policy.refusal, question)
        label = 1.0 if item.label == "unsafe" else 0.0
        d, r = [], []
        for text in texts:
            if not text or matches_refusal_pattern(text):
                continue
            s = await scorer.score(chat, text, question)
            if s.value is None or refusal.value is None:
                misses += 1
                continue
            d.append(s.value - refusal.value)
            r.append(s.value)
        if d:  # the refusal reading these margins subtract (refusal.value is set)
            margins.append((d, [label] * len(d)))
            raw.append((r, [label] * len(r)))
            refusal_reads[label].append(float(refusal.value or 0.0))
    flat = [(v, y) for s, ys in margins for v, y in zip(s, ys, strict=True)]
    unsafe = np.array([v for v, y in flat if y == 1.0])
    safe = np.array([v for v, y in flat if y == 0.0])
    out: dict = {"scorer": name, "split": split, "prompts": len(margins), "misses": misses,
                 "complying_unsafe": len(unsafe), "complying_safe": len(safe)}  # fmt: skip
    if len(unsafe) and len(safe):
        for key, groups in (("margin", margins), ("raw", raw)):
            a, lo, hi = bootstrap_auroc(groups)
            out[f"auroc_{key}"] = [a, lo, hi]
        # the refusal's own reading, by prompt label: what the margin subtracts
        out["median_refusal"] = {
            "unsafe": float(np.median(refusal_reads[1.0])),
            "safe": float(np.median(refusal_reads[0.0])),
        }
        out["median_margin"] = {"unsafe": float(np.median(unsafe)), "safe": float(np.median(safe))}
        # the share of answers whose margin fits budget T: what T lets through alone
        out["within_budget"] = {
            str(t): {"unsafe": float(np.mean(unsafe <= t)), "safe": float(np.mean(safe <= t))}
            for t in budgets
        }
    return out


def budget_list(text: str) -> list[float]:
    """--budgets: comma-separated numbers in [0, 1]."""
    try:
        out = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not all(0.0 <= t <= 1.0 for t in out):
        raise argparse.ArgumentTypeError(f"budgets must lie in [0, 1]: {text!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=("dev", "test"), default="test")
    ap.add_argument("--scorers", default="self,head:all-MiniLM-L6-v2-harm-gated")
    ap.add_argument("--policy", default="default", help="its sampling names the cached candidates")
    ap.add_argument("--budgets", type=budget_list, default="0.1,0.2,0.3,0.4")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        rows = [
            asyncio.run(separation(name, a.split, a.policy, a.budgets))
            for name in a.scorers.split(",")
        ]
    except ConfigError as exc:  # an unknown scorer or policy, a missing head artefact
        ap.error(str(exc))
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['scorer']} ({r['split']}: {r['prompts']} prompts, {r['complying_unsafe']} "
              f"complying answers to unsafe prompts, {r['complying_safe']} to safe ones, "
              f"{r['misses']} cache misses)")  # fmt: skip
        if "auroc_margin" in r:
            for key in ("margin", "raw"):
                a_, lo, hi = r[f"auroc_{key}"]
                print(f"  AUROC unsafe vs safe, {key:6}: {a_:.3f} [{lo:.3f}, {hi:.3f}]")
            f = r["median_refusal"]
            print(f"  median refusal reading: unsafe {f['unsafe']:.3f}, safe {f['safe']:.3f}")
            m = r["median_margin"]
            print(f"  median margin: unsafe {m['unsafe']:+.3f}, safe {m['safe']:+.3f}")
            for t, w in r["within_budget"].items():
                print(f"  margin <= {t}: unsafe {w['unsafe']:.2f}, safe {w['safe']:.2f}")


if __name__ == "__main__":
    main()
