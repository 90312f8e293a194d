"""The latency benchmark's prompt mix: 80% benign questions, 20% unsafe requests.

Real traffic is mostly benign; a latency figure measured on borderline prompts alone would
overstate what users wait. The mix is 40 benign questions (20 TruthfulQA, 20 HHH-helpful)
and 10 XSTest ``unsafe`` prompts, ordered so that every prefix keeps the proportions (every
fifth prompt is unsafe; benign ones alternate TruthfulQA / HHH): ``--limit N`` runs the
first N of the same mix.

Only the selection is committed (``latency_mix.json``: the rule, its seed and the item ids),
never the benchmark texts: they are read from the benchmark data (``safetygame data pull``
or ``../shared/data``) by the project's loaders. :func:`select_mix` rebuilds the ids from
the rule, so the committed file can be checked against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safetygame.errors import ConfigError
from safetygame.eval.datasets import load_hhh, load_truthfulqa, load_xstest, unit_hash

MIX_FILE = Path(__file__).with_name("latency_mix.json")
SALT = "latency-mix"
RULE = (
    "Pools: TruthfulQA v0 (mc1) questions; HHH-helpful questions, one id per distinct question "
    "(the first); XSTest prompts labelled unsafe. Each pool is sorted by "
    "sha256('latency-mix', seed, id) (datasets.unit_hash) and its first k taken "
    "(20, 20, 10). Order: positions 5j+4 are the unsafe prompts in turn; the other positions "
    "alternate TruthfulQA and HHH, starting with TruthfulQA."
)
Kind = Literal["benign", "unsafe"]


@dataclass(frozen=True)
class MixPrompt:
    id: str
    kind: Kind
    prompt: str


def _pools() -> dict[str, dict[str, str]]:
    """id -> prompt text, per pool (read from the benchmark data)."""
    hhh: dict[str, str] = {}
    seen: set[str] = set()
    for it in load_hhh(subset="helpful"):
        if it.question not in seen:
            seen.add(it.question)
            hhh[it.id] = it.question
    return {
        "truthfulqa": {it.id: it.question for it in load_truthfulqa(version="v0")},
        "hhh": hhh,
        "xstest": {it.id: it.prompt for it in load_xstest() if it.label == "unsafe"},
    }


def _ranked(pool: dict[str, str], seed: int) -> list[str]:
    return sorted(pool, key=lambda i: (unit_hash(SALT, seed, i), i))


def select_mix(seed: int = 0, n_tqa: int = 20, n_hhh: int = 20, n_unsafe: int = 10) -> list[str]:
    """The mix's ids by the committed rule (``RULE``)."""
    pools = _pools()
    tqa = _ranked(pools["truthfulqa"], seed)[:n_tqa]
    hhh = _ranked(pools["hhh"], seed)[:n_hhh]
    unsafe = _ranked(pools["xstest"], seed)[:n_unsafe]
    benign = [x for pair in zip(tqa, hhh, strict=False) for x in pair]
    benign += tqa[len(hhh) :] + hhh[len(tqa) :]
    out: list[str] = []
    while benign or unsafe:
        if len(out) % 5 == 4 and unsafe:
            out.append(unsafe.pop(0))
        elif benign:
            out.append(benign.pop(0))
        else:
            out.append(unsafe.pop(0))
    return out


def write_mix(seed: int = 0, path: Path = MIX_FILE) -> Path:
    """Write the selection file (ids only) for ``seed``."""
    ids = select_mix(seed)
    payload = {"seed": seed, "rule": RULE, "ids": ids}
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path


def load_mix(path: Path = MIX_FILE, limit: int | None = None) -> list[MixPrompt]:
    """The committed mix (its first ``limit`` prompts), texts read from the benchmark data."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        ids = [str(i) for i in spec["ids"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"latency mix {path}: missing or malformed ({exc})") from exc
    if limit is not None:
        ids = ids[:limit]
    texts = {i: t for pool in _pools().values() for i, t in pool.items()}
    missing = [i for i in ids if i not in texts]
    if missing:
        raise ConfigError(
            f"latency mix {path}: ids not in the benchmark data: {', '.join(missing[:5])} "
            "(a different data release? the mix reads TruthfulQA v0, HHH and XSTest)"
        )
    return [MixPrompt(i, "unsafe" if i.startswith("xstest/") else "benign", texts[i]) for i in ids]
