"""Labelled replies for fitting and measuring learned harm scorers (``safetygame.heads``).

Every row is one reply in its conversation. Labels come in two shapes:

- **points**: (row, label), label 1 = harmful reply (the logistic head's data);
- **pairs**: (more harmful row, less harmful row) (the Bradley-Terry head's data).

Sources (``../shared/data``; docs/probes.md states what each contributes and why):

- ``hh-rlhf`` harmless-base (2,312 preference pairs): the last assistant reply of ``rejected``
  is more harmful than that of ``chosen``. Only the last human turn is kept as context (the
  judge reads ~30 tokens a second here). Split by a hash of the *first* human turn: dev iff
  sha256("hh-split", seed, first turn) < 0.25. Pairs whose replies or last human turn match
  an HHH question or option after normalisation (lower case, letters and digits only) are
  dropped and counted: no benchmark text enters training.
- ``advbench`` behaviours: the goal with its compliant target (harmful), and the same goal
  with the policy refusal (harmless); a pair target > refusal. Shaped like the deployment
  question, compliance against refusal.
- ``openai-moderation`` samples (optional): texts flagged in any category are harmful, the
  others not; shown to the judge as a reply with no conversation. Points only.
- ``xstest`` **harness dev** prompts only (the 20% hash split of ``safetygame eval xstest``,
  so no reported test prompt is touched): the sampled candidates from the score cache (the
  committed ``resume/xstest.jsonl.gz``), labelled by the refusal pattern detector: a
  complying answer to an ``unsafe`` prompt is harmful; a refusal, and any answer to a
  ``safe`` prompt, is not; each prompt's policy refusal is a harmless row and the lower side
  of a pair with every complying answer to an unsafe prompt.

The **evaluation** sets are built here too, read once for the report: HHH harmless options
(the probe split's test items), and XSTest harness-test prompts: complying answers to unsafe
prompts against the policy refusal.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safetygame.backends.base import Message
from safetygame.cache import ScoreCache, content_key
from safetygame.errors import ConfigError
from safetygame.eval import datasets
from safetygame.eval.datasets import MCItem, PromptItem, unit_hash
from safetygame.eval.harness import dev_test_split
from safetygame.eval.refusal import item_seed, matches_refusal_pattern, prompt_chat
from safetygame.policy import Policy

__all__ = ["LabelledSet", "Row", "hh_pairs", "normalise", "xstest_candidates"]


@dataclass(frozen=True)
class Row:
    conversation: tuple[Message, ...]
    reply: str
    source: str


@dataclass
class LabelledSet:
    """Rows (each reply once) with point labels and preference pairs over them."""

    rows: list[Row] = field(default_factory=list)
    points: list[tuple[int, float]] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)
    _index: dict[tuple[tuple[Message, ...], str], int] = field(default_factory=dict, repr=False)

    def add(self, conversation: Sequence[Message], reply: str, source: str) -> int:
        key = (tuple(conversation), reply)
        if key not in self._index:
            self._index[key] = len(self.rows)
            self.rows.append(Row(tuple(conversation), reply, source))
        return self._index[key]

    def point(self, conversation: Sequence[Message], reply: str, label: float, src: str) -> int:
        i = self.add(conversation, reply, src)
        self.points.append((i, float(label)))
        return i

    def pair(self, more: int, less: int) -> None:
        self.pairs.append((more, less))

    def extend(self, other: LabelledSet) -> None:
        remap = [self.add(r.conversation, r.reply, r.source) for r in other.rows]
        self.points += [(remap[i], y) for i, y in other.points]
        self.pairs += [(remap[a], remap[b]) for a, b in other.pairs]
        for k, v in other.notes.items():
            self.notes[k] = self.notes.get(k, 0) + v


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _hhh_texts() -> set[str]:
    texts: set[str] = set()
    for it in datasets.load_hhh():
        texts.add(normalise(it.question))
        texts.update(normalise(o) for o in it.options)
    return {t for t in texts if len(t) >= 12}


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _dialogue(text: str) -> list[tuple[str, str]]:
    parts = _TURN.split(text)
    turns = []
    for k in range(1, len(parts) - 1, 2):
        turns.append(("user" if parts[k] == "Human" else "assistant", parts[k + 1].strip()))
    return turns


def hh_pairs(
    path: Path, split: str, n: int | None, seed: int = 0, dev_fraction: float = 0.25
) -> LabelledSet:
    """``n`` seeded hh-rlhf pairs of one split (``train`` or ``dev``): rejected > chosen."""
    if split not in ("train", "dev"):
        raise ConfigError(f"hh-rlhf split must be train or dev, not {split!r}")
    hhh = _hhh_texts()
    out = LabelledSet()
    kept: list[tuple[float, tuple[Message, ...], str, str]] = []
    conv: tuple[Message, ...]
    dropped = 0
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
                chosen, rejected = _dialogue(rec["chosen"]), _dialogue(rec["rejected"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{line_no}: not an hh-rlhf pair ({exc})") from exc
            if not chosen or not rejected or chosen[-1][0] != "assistant":
                continue
            if rejected[-1][0] != "assistant" or chosen[:-1] != rejected[:-1]:
                continue
            a, b = chosen[-1][1], rejected[-1][1]
            users = [t for r, t in chosen[:-1] if r == "user"]
            if not users or not a or not b or a == b:
                continue
            is_dev = unit_hash("hh-split", seed, users[0]) < dev_fraction
            if is_dev != (split == "dev"):
                continue
            if any(normalise(t) in hhh for t in (a, b, users[-1])):
                dropped += 1
                continue
            conv = (Message("user", users[-1]),)
            kept.append((unit_hash("hh-draw", seed, str(line_no)), conv, b, a))
    kept.sort(key=lambda k: k[0])
    for _, conv, rejected_reply, chosen_reply in kept[:n]:
        more = out.add(conv, rejected_reply, f"hh-rlhf/{split}")
        less = out.add(conv, chosen_reply, f"hh-rlhf/{split}")
        out.pair(more, less)
    out.notes[f"hh-rlhf/{split}: pairs"] = len(out.pairs)
    out.notes[f"hh-rlhf/{split}: dropped as HHH duplicates"] = dropped
    return out


def advbench_rows(n: int | None, refusal: str, seed: int = 0) -> LabelledSet:
    """``n`` seeded AdvBench behaviours: (goal, target) harmful, (goal, refusal) not; a pair."""
    items = [it for it in datasets.load("advbench") if isinstance(it, PromptItem) and it.target]
    items.sort(key=lambda it: unit_hash("adv-draw", seed, it.id))
    out = LabelledSet()
    for it in items[:n]:
        conv = (Message("user", it.prompt),)
        more = out.point(conv, str(it.target), 1.0, "advbench")
        less = out.point(conv, refusal, 0.0, "advbench")
        out.pair(more, less)
    out.notes["advbench: behaviours"] = min(len(items), n if n is not None else len(items))
    return out


def moderation_rows(path: Path, n: int | None, seed: int = 0) -> LabelledSet:
    """``n`` seeded OpenAI moderation samples as replies with no conversation: flagged in any
    category = harmful. Text-level harm, so points only (no pairs)."""
    recs: list[tuple[float, str, float]] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
                text = str(rec["prompt"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{line_no}: not a moderation sample ({exc})") from exc
            flags = [v for k, v in rec.items() if k != "prompt" and v is not None]
            if not text.strip() or not flags:
                continue
            label = 1.0 if any(int(v) == 1 for v in flags) else 0.0
            recs.append((unit_hash("mod-draw", seed, str(line_no)), text, label))
    recs.sort(key=lambda r: r[0])
    out = LabelledSet()
    for _, text, label in recs[:n]:
        out.point((), text, label, "openai-moderation")
    out.notes["openai-moderation: texts"] = len(out.points)
    return out


def xstest_split(seed: int = 0, dev_fraction: float = 0.2) -> tuple[list[PromptItem], ...]:
    """The XSTest harness split (``safetygame eval xstest``): (dev, test)."""
    items = [it for it in datasets.load("xstest") if isinstance(it, PromptItem)]
    sp = dev_test_split(items, dev_fraction, seed)
    return list(sp.dev), list(sp.test)


def xstest_candidates(
    item: PromptItem, policy: Policy, cache: ScoreCache, model_id: str, seed: int = 0
) -> list[str] | None:
    """The candidates ``safetygame eval xstest`` sampled for ``item`` (from the score cache,
    keyed as its caching backend keys them), or None when the cache has none."""
    s = policy.sampling
    payload = [
        [m.to_dict() for m in prompt_chat(item)],
        s.n,
        [s.temperature, s.top_p, s.max_tokens, item_seed(seed, item.id)],
    ]
    hit = cache.get(content_key("sample", model_id, payload))
    if not isinstance(hit, list):
        return None
    return [str(c.get("text", "")).strip() for c in hit if isinstance(c, dict)]


def xstest_rows(
    items: Iterable[PromptItem],
    policy: Policy,
    cache: ScoreCache,
    model_id: str,
    *,
    safe_prompts: bool = True,
    safe_candidates: int | None = None,
    name: str = "xstest",
) -> LabelledSet:
    """Candidates of XSTest prompts labelled by the refusal patterns (see module doc).
    ``safe_candidates`` keeps only the first k candidates of a ``safe`` prompt (cost)."""
    out = LabelledSet()
    missing = 0
    for it in items:
        cands = xstest_candidates(it, policy, cache, model_id)
        if cands is None:
            missing += 1
            continue
        conv = prompt_chat(it)
        unsafe = it.label == "unsafe"
        if not unsafe and not safe_prompts:
            continue
        ref = out.point(conv, policy.refusal, 0.0, name)
        if not unsafe and safe_candidates is not None:
            cands = cands[:safe_candidates]
        for text in cands:
            if not text:
                continue
            harmful = unsafe and not matches_refusal_pattern(text)
            i = out.point(conv, text, 1.0 if harmful else 0.0, name)
            if harmful:
                out.pair(i, ref)
    out.notes[f"{name}: prompts without cached candidates"] = missing
    return out


def hhh_harmless_rows(
    items: Sequence[MCItem],
) -> tuple[LabelledSet, list[list[tuple[int, float]]]]:
    """HHH harmless options as rows and, per item, (row, harm label) of each option: label 1
    = the option HHH does not prefer. Items repeat questions and options, so rows are
    shared between items."""
    out = LabelledSet()
    groups = []
    for it in items:
        conv = (Message("user", it.question),)
        groups.append(
            [
                (out.point(conv, o, 1.0 - y, "hhh-harmless"), 1.0 - y)
                for o, y in zip(it.options, it.labels, strict=True)
            ]
        )
    return out, groups


@dataclass(frozen=True)
class Recipe:
    """How many rows of each source a head is fitted on (the judge's reading cost decides)."""

    hh_train: int = 60
    hh_dev: int = 30
    advbench: int = 60
    xstest_safe_candidates: int = 4
    moderation: int = 0
    seed: int = 0

    @classmethod
    def tiny(cls) -> Recipe:
        """The CI-sized recipe (seconds with the small model)."""
        return cls(hh_train=6, hh_dev=4, advbench=6, xstest_safe_candidates=0, moderation=4)


def training_set(
    recipe: Recipe, policy: Policy, cache: ScoreCache, model_id: str, *, xstest_limit: int | None
) -> tuple[LabelledSet, LabelledSet]:
    """(train, dev): train = hh-rlhf train pairs + AdvBench + XSTest harness-dev candidates;
    dev = hh-rlhf dev pairs (for choosing the pooling, objective and ridge)."""
    hh = datasets.benchmark_dir("hh-rlhf") / "harmless-base-test.jsonl.gz"
    train = hh_pairs(hh, "train", recipe.hh_train, recipe.seed)
    train.extend(advbench_rows(recipe.advbench, policy.refusal, recipe.seed))
    if recipe.moderation:
        mod = datasets.benchmark_dir("openai-moderation") / "samples-1680.jsonl.gz"
        train.extend(moderation_rows(mod, recipe.moderation, recipe.seed))
    dev_items, _ = xstest_split(recipe.seed)
    if xstest_limit is not None:
        dev_items = dev_items[:xstest_limit]
    train.extend(
        xstest_rows(
            dev_items, policy, cache, model_id,
            safe_candidates=recipe.xstest_safe_candidates, name="xstest-dev",
        )
    )  # fmt: skip
    dev = hh_pairs(hh, "dev", recipe.hh_dev, recipe.seed)
    return train, dev
