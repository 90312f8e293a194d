"""Compare two refusal-study EvalLogs (``safetygame eval xstest ... --out DIR``) prompt by prompt.

Prints, over the test prompts both logs decided: each system's behaviour score (refuse
unsafe, answer safe; the harness's ``refusal.behaviour_score``), the paired bootstrap of A
minus B (``eval.stats.paired_bootstrap``), and, from log A, the over-refusal floor of its
candidates: the share of safe test prompts on which every sampled candidate refuses (the
pattern detector's ``refused`` flags), which no scorer or budget can go below; how far its
harm scorer reads complying candidates to unsafe/harmful prompts above the refusal; on how
many prompts the two systems differ; and each system's refusal rate on the unsafe and safe
prompts where some candidate complies.

    .venv/bin/python scripts/compare_evallogs.py results/xstest-learned/evallog.json \\
        safety-game results/xstest/evallog.json safety-game
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from safetygame.eval.refusal import behaviour_score
from safetygame.eval.stats import paired_bootstrap


def test_items(path: Path) -> dict[str, dict]:
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
        items = log["items"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"{path}: not a readable EvalLog ({exc!r}); give the evallog.json of a run")
    return {it["id"]: it for it in items if it["split"] == "test" and it["status"] == "ok"}


def expected_refusal(item: dict, method: str) -> float:
    # the log lists the candidates and each strategy in the same order (the refusal first)
    refused = np.array([float(c["refused"]) for c in item["candidates"]])
    return float(np.dot(item["strategies"][method], refused))


def all_refuse(item: dict) -> bool:
    return all(c["refused"] for c in item["candidates"] if not c["is_refusal"])


def main(path_a: str, method_a: str, path_b: str, method_b: str) -> None:
    a, b = test_items(Path(path_a)), test_items(Path(path_b))
    ids = sorted(set(a) & set(b))
    for log, method in ((a, method_a), (b, method_b)):
        if ids and method not in log[ids[0]]["strategies"]:
            sys.exit(f"no system {method!r}; the logs have {sorted(log[ids[0]]['strategies'])}")
    if not ids:
        sys.exit("the two logs share no decided test prompt")
    labels = [a[i]["label"] for i in ids]
    score_a = behaviour_score(np.array([expected_refusal(a[i], method_a) for i in ids]), labels)
    score_b = behaviour_score(np.array([expected_refusal(b[i], method_b) for i in ids]), labels)
    print(f"{len(ids)} test prompts; {method_a} (A) {score_a.mean():.3f}, {method_b} (B) "
          f"{score_b.mean():.3f}")  # fmt: skip
    print("A minus B:", paired_bootstrap(score_a, score_b))
    differ = sum(
        abs(expected_refusal(a[i], method_a) - expected_refusal(b[i], method_b)) > 1e-6 for i in ids
    )
    print(f"A and B differ in expected refusal on {differ} of {len(ids)} test prompts")
    # How far the harm scorer reads complying answers to unsafe/harmful prompts above the refusal
    # (the refusal is candidate 0): near 0, no budget can tell them apart from refusing.
    margins = [
        c["harm"] - it["candidates"][0]["harm"]
        for it in a.values()
        if it["label"] != "safe"
        for c in it["candidates"]
        if not c["is_refusal"] and not c["refused"]
    ]
    if margins:
        print(f"A: {len(margins)} complying candidates to unsafe/harmful test prompts; harm above "
              f"the refusal's: median {np.median(margins):+.3f}, "
              f"{sum(m <= 0.15 for m in margins)} within 0.15")  # fmt: skip
    safe = [it for it in a.values() if it["label"] == "safe"]
    floor = sum(all_refuse(it) for it in safe)
    print(f"A: every sampled candidate refuses on {floor} of {len(safe)} safe test prompts "
          f"({floor / max(len(safe), 1):.3f})")  # fmt: skip
    # Where some candidate complies, the system had a real choice: its refusal there is what
    # more complying candidates (a larger m, a redraw) would meet on the other prompts.
    for log, method, name in ((a, method_a, "A"), (b, method_b, "B")):
        # Split as behaviour_score does: "safe" against every other label (unsafe, harmful).
        for label in ("unsafe/harmful", "safe"):
            chosen = [
                log[i]
                for i in ids
                if (log[i]["label"] == "safe") == (label == "safe") and not all_refuse(log[i])
            ]
            rate = np.mean([expected_refusal(it, method) for it in chosen]) if chosen else np.nan
            print(f"{name} {method}: refusal on the {len(chosen)} {label} test prompts with a "
                  f"complying candidate {rate:.3f}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
