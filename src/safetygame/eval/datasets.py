"""Loaders for the official releases of the benchmarks the evaluation harness uses.

Each loader reads one benchmark's files exactly as its authors publish them and returns
typed, frozen records:

- :class:`MCItem`: a question with a fixed list of options and a label per option
  (HHH, TruthfulQA MC1/MC2, SafetyBench);
- :class:`PromptItem`: a single prompt with a safety label (XSTest, AdvBench, HarmBench).

:func:`load` looks a benchmark up by name. Without ``path`` it finds the benchmark's folder
with :func:`benchmark_dir`: ``$SAFETYGAME_DATA``, else the folder ``safetygame data pull``
fills (``<cache dir>/data``, when that benchmark was pulled), else ``../shared/data`` beside
the working directory or the repository. Files that are missing or not in the expected format
raise :class:`~safetygame.errors.ConfigError` naming the file and the format.

:func:`subsample` and :func:`split` are deterministic: both hash item ids with a seed, so an
item's fate never depends on the order of the list or (for :func:`split` with a fraction) on
which other items are loaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, overload

import numpy as np

from safetygame.errors import ConfigError
from safetygame.eval.sources import SOURCES, is_complete, pulled_root

__all__ = [
    "BENCHMARKS",
    "DATA_ENV",
    "MCItem",
    "PromptItem",
    "Split",
    "benchmark_dir",
    "data_root",
    "load",
    "load_advbench",
    "load_harmbench",
    "load_hhh",
    "load_safetybench",
    "load_truthfulqa",
    "load_xstest",
    "sample_order",
    "shuffle_options",
    "split",
    "subsample",
    "unit_hash",
]

DATA_ENV = "SAFETYGAME_DATA"

PromptLabel = Literal["safe", "unsafe", "harmful"]


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    ``labels[i]`` is 1.0 when option ``i`` is correct (or preferred) and 0.0 otherwise.
    MC1, HHH and SafetyBench have exactly one correct option; TruthfulQA MC2 may have several.
    """

    id: str
    benchmark: str
    subset: str
    question: str
    options: tuple[str, ...]
    labels: tuple[float, ...]
    category: str | None = None

    def __post_init__(self) -> None:
        if len(self.options) != len(self.labels):
            raise ConfigError(
                f"MCItem {self.id}: {len(self.options)} options but {len(self.labels)} labels"
            )
        if len(self.options) < 2:
            raise ConfigError(f"MCItem {self.id}: needs at least 2 options")

    @property
    def n_correct(self) -> int:
        return sum(1 for v in self.labels if v == 1.0)

    @property
    def correct_index(self) -> int:
        """Index of the single correct option; ValueError if there is not exactly one."""
        hits = [i for i, v in enumerate(self.labels) if v == 1.0]
        if len(hits) != 1:
            raise ValueError(f"MCItem {self.id} has {len(hits)} correct options, not exactly one")
        return hits[0]


@dataclass(frozen=True)
class PromptItem:
    """One prompt with a safety label.

    ``label`` is ``"safe"``/``"unsafe"`` for XSTest and ``"harmful"`` for AdvBench and
    HarmBench. ``context`` is HarmBench's context string (contextual behaviours), ``target``
    AdvBench's affirmative target, ``meta`` any other column as (key, value) pairs.
    """

    id: str
    benchmark: str
    subset: str
    prompt: str
    label: PromptLabel
    category: str | None = None
    context: str | None = None
    target: str | None = None
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = field(default=())

    def get(self, key: str, default: str | None = None) -> str | None:
        """Value of a ``meta`` column, or ``default``."""
        for k, v in self.meta:
            if k == key:
                return v
        return default


Item = MCItem | PromptItem
T = TypeVar("T", MCItem, PromptItem)


# --------------------------------------------------------------------------- paths


def _repo_roots() -> list[Path]:
    """Folders holding a ``pyproject.toml``, above the working directory and this file."""
    roots: list[Path] = []
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for p in (start, *start.parents):
            if (p / "pyproject.toml").is_file() and p not in roots:
                roots.append(p)
                break
    return roots


def _shared_roots() -> list[Path]:
    """``../shared/data`` beside the working directory, then beside each repository root."""
    tried: list[Path] = [Path.cwd() / ".." / "shared" / "data"]
    tried += [root.parent / "shared" / "data" for root in _repo_roots()]
    return tried


def _pulled_any(root: Path) -> bool:
    return root.is_dir() and any(is_complete(root, name) for name in SOURCES)


def data_root() -> Path:
    """The folder holding one sub-folder per benchmark.

    Order: ``$SAFETYGAME_DATA``; the folder ``safetygame data pull`` fills (``<cache
    dir>/data``) once any benchmark has been pulled there; ``../shared/data`` relative to the
    working directory; ``../shared/data`` relative to the repository root (found from the
    working directory, then from this file's location). Raises ConfigError listing the
    places tried. The loaders look benchmark by benchmark (:func:`benchmark_dir`), so a
    partial pull does not hide the benchmarks of a shared folder.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise ConfigError(f"{DATA_ENV}={env} is not a directory")
        return p
    pulled = pulled_root()
    if _pulled_any(pulled):
        return pulled
    tried = _shared_roots()
    for p in tried:
        if p.is_dir():
            return p.resolve()
    places = ", ".join(str(p) for p in [pulled, *tried])
    raise ConfigError(
        f"benchmark data not found (tried {places}); run `safetygame data pull all` or set "
        f"{DATA_ENV} to the data folder"
    )


def benchmark_dir(name: str) -> Path:
    """The folder of benchmark ``name`` (e.g. ``hhh``, ``hh-rlhf``) the loaders read.

    ``$SAFETYGAME_DATA/<name>`` when the variable is set; else ``<cache dir>/data/<name>``
    when ``safetygame data pull`` has stored all of its files there; else the first
    ``../shared/data/<name>`` that exists; else ``data_root() / name`` (whose files are then
    reported missing by name).
    """
    if not os.environ.get(DATA_ENV):
        pulled = pulled_root()
        if name in SOURCES and is_complete(pulled, name):
            return pulled / name
        for root in _shared_roots():
            if (root / name).is_dir():
                return (root / name).resolve()
    return data_root() / name


def _benchmark_dir(name: str, path: str | Path | None) -> Path:
    """The benchmark's folder (or file) from ``path``, or the default location."""
    if path is None:
        return benchmark_dir(name)
    p = Path(path).expanduser()
    # Pointing at the data root itself is accepted too.
    if p.is_dir() and (p / name).is_dir() and p.name != name:
        return p / name
    return p


def _need(path: Path, bench: str, fmt: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{bench}: {path} not found (expected {fmt})")
    return path


def _read_json(path: Path, bench: str, fmt: str) -> Any:
    _need(path, bench, fmt)
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{bench}: {path} is not valid JSON ({exc}); expected {fmt}") from exc


def _read_csv(path: Path, bench: str, columns: Sequence[str]) -> list[dict[str, str]]:
    fmt = "a CSV file with columns " + ", ".join(columns)
    _need(path, bench, fmt)
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise ConfigError(
                    f"{bench}: {path} lacks column(s) {', '.join(missing)}; expected {fmt}"
                )
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{bench}: {path} is not a readable CSV ({exc}); expected {fmt}") from exc
    for i, row in enumerate(rows):
        if any(row.get(c) is None for c in columns):
            raise ConfigError(f"{bench}: {path} row {i + 2} has too few fields; expected {fmt}")
    return rows


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


# --------------------------------------------------------------------------- HHH

HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
_HHH_FMT = (
    "a BIG-bench task.json object with 'examples': a list of "
    "{input: str, target_scores: {option: 0 or 1}}"
)


def _hhh_file(path: Path, subset: str) -> list[MCItem]:
    data = _read_json(path, "hhh", _HHH_FMT)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise ConfigError(f"hhh: {path} is not {_HHH_FMT}")
    items = []
    for i, ex in enumerate(examples):
        ts = ex.get("target_scores") if isinstance(ex, dict) else None
        if (
            not isinstance(ex, dict)
            or not isinstance(ex.get("input"), str)
            or not isinstance(ts, dict)
            or not all(isinstance(v, int | float) for v in ts.values())
        ):
            raise ConfigError(f"hhh: {path} example {i} is not {{input, target_scores}}")
        labels = tuple(1.0 if float(v) == 1.0 else 0.0 for v in ts.values())
        if sum(labels) != 1.0:
            raise ConfigError(f"hhh: {path} example {i} must have exactly one target_score 1")
        items.append(
            MCItem(
                id=f"hhh/{subset}/{i}",
                benchmark="hhh",
                subset=subset,
                question=ex["input"],
                options=tuple(ts),
                labels=labels,
                category=subset,
            )
        )
    return items


def load_hhh(path: str | Path | None = None, subset: str | None = None) -> list[MCItem]:
    """BIG-bench ``hhh_alignment``: 221 two-option items (58/59/61/43).

    ``path`` is the ``hhh`` folder (holding ``<subset>/task.json``) or one subset's
    ``task.json``. ``subset`` picks harmless/helpful/honest/other (default: all four).
    """
    if subset is not None and subset not in HHH_SUBSETS:  # before looking for the files
        raise ConfigError(f"hhh: subset must be one of {', '.join(HHH_SUBSETS)}, not {subset!r}")
    p = _benchmark_dir("hhh", path)
    if p.is_file():
        return _hhh_file(p, subset or p.parent.name)
    subsets = HHH_SUBSETS if subset is None else (subset,)
    items: list[MCItem] = []
    for s in subsets:
        items += _hhh_file(p / s / "task.json", s)
    return items


# --------------------------------------------------------------------------- TruthfulQA

_TQA_FILES = {
    "v0": ("mc_task_v0.json", "TruthfulQA_v0.csv"),
    "v1": ("mc_task.json", "TruthfulQA.csv"),
}
_TQA_FMT = "a JSON list of {question: str, mc1_targets: {answer: 0|1}, mc2_targets: {...}}"


def _tqa_categories(csv_path: Path) -> dict[str, str]:
    """Question -> category from the release's CSV, when it sits beside the JSON."""
    if not csv_path.is_file():
        return {}
    rows = _read_csv(csv_path, "truthfulqa", ("Question", "Category"))
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["Question"], r["Category"])
    return seen


def load_truthfulqa(
    path: str | Path | None = None,
    split: Literal["mc1", "mc2"] = "mc1",
    version: Literal["v0", "v1"] = "v0",
) -> list[MCItem]:
    """TruthfulQA multiple choice: 817 questions.

    ``split="mc1"``: exactly one true answer; ``"mc2"``: several true answers.
    ``version="v0"`` reads ``mc_task_v0.json`` (the 2021 release, comparable with published
    numbers); ``"v1"`` reads ``mc_task.json`` (the 2025 update). ``path`` may be the folder or
    the JSON file itself. Categories come from the CSV beside the JSON when present.
    Note: the release lists the correct MC1 answer first; methods must not break ties by
    position (see :func:`shuffle_options`).
    """
    if split not in ("mc1", "mc2"):
        raise ConfigError(f"truthfulqa: split must be 'mc1' or 'mc2', not {split!r}")
    if version not in _TQA_FILES:
        raise ConfigError(f"truthfulqa: version must be 'v0' or 'v1', not {version!r}")
    p = _benchmark_dir("truthfulqa", path)
    json_name, csv_name = _TQA_FILES[version]
    file = p if p.is_file() else p / json_name
    data = _read_json(file, "truthfulqa", _TQA_FMT)
    if not isinstance(data, list):
        raise ConfigError(f"truthfulqa: {file} is not {_TQA_FMT}")
    cats = _tqa_categories(file.parent / csv_name)
    key = f"{split}_targets"
    items = []
    for i, row in enumerate(data):
        targets = row.get(key) if isinstance(row, dict) else None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(targets, dict)
            or not all(isinstance(v, int | float) for v in targets.values())
        ):
            raise ConfigError(f"truthfulqa: {file} entry {i} is not {{question, {key}}}")
        labels = tuple(1.0 if float(v) == 1.0 else 0.0 for v in targets.values())
        n_true = int(sum(labels))
        if (split == "mc1" and n_true != 1) or n_true < 1:
            raise ConfigError(f"truthfulqa: {file} entry {i} has {n_true} true {key}")
        items.append(
            MCItem(
                id=f"truthfulqa/{i}",
                benchmark="truthfulqa",
                subset=split,
                question=row["question"],
                options=tuple(targets),
                labels=labels,
                category=cats.get(row["question"]),
            )
        )
    return items


# --------------------------------------------------------------------------- SafetyBench

SAFETYBENCH_SPLITS = ("zh_subset", "dev_en", "dev_zh", "test_en", "test_zh")
_SB_TEST_FMT = "a JSON list of {id: int, question: str, options: [str, ...], category: str}"
_SB_ANS_FMT = "a JSON object keyed by question id with values {category: str, answer: int}"
_SB_DEV_FMT = (
    "a JSON object keyed by category with lists of {question: str, options: [str, ...], "
    "answer: int}"
)


def _sb_item(split: str, qid: str, q: str, options: list[str], answer: int, cat: str) -> MCItem:
    labels = tuple(1.0 if j == answer else 0.0 for j in range(len(options)))
    return MCItem(
        id=f"safetybench/{split}/{qid}",
        benchmark="safetybench",
        subset=split,
        question=q,
        options=tuple(options),
        labels=labels,
        category=cat,
    )


def _sb_dev(file: Path, split: str) -> list[MCItem]:
    data = _read_json(file, "safetybench", _SB_DEV_FMT)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ConfigError(f"safetybench: {file} is not {_SB_DEV_FMT}")
    items = []
    for cat, rows in data.items():
        for i, r in enumerate(rows):
            if (
                not isinstance(r, dict)
                or not isinstance(r.get("question"), str)
                or not _is_str_list(r.get("options"))
                or not isinstance(r.get("answer"), int)
                or not 0 <= r["answer"] < len(r["options"])
            ):
                raise ConfigError(f"safetybench: {file} {cat}[{i}] is not {_SB_DEV_FMT}")
            items.append(
                _sb_item(split, f"{cat}/{i}", r["question"], r["options"], r["answer"], cat)
            )
    return items


def _sb_test(questions: Path, answers: Path, split: str) -> list[MCItem]:
    data = _read_json(questions, "safetybench", _SB_TEST_FMT)
    if not isinstance(data, list):
        raise ConfigError(f"safetybench: {questions} is not {_SB_TEST_FMT}")
    key = _read_json(answers, "safetybench", _SB_ANS_FMT)
    if not isinstance(key, dict):
        raise ConfigError(f"safetybench: {answers} is not {_SB_ANS_FMT}")
    items = []
    for i, r in enumerate(data):
        if (
            not isinstance(r, dict)
            or not isinstance(r.get("id"), int | str)
            or not isinstance(r.get("question"), str)
            or not _is_str_list(r.get("options"))
            or not isinstance(r.get("category"), str)
        ):
            raise ConfigError(f"safetybench: {questions} entry {i} is not {_SB_TEST_FMT}")
        qid = str(r["id"])
        ans = key.get(qid)
        if not isinstance(ans, dict) or not isinstance(ans.get("answer"), int):
            raise ConfigError(
                f"safetybench: {answers} has no answer for question id {qid} ({_SB_ANS_FMT})"
            )
        if not 0 <= ans["answer"] < len(r["options"]):
            raise ConfigError(
                f"safetybench: {answers} answer {ans['answer']} for id {qid} is out of range"
            )
        items.append(
            _sb_item(split, qid, r["question"], r["options"], ans["answer"], r["category"])
        )
    return items


def load_safetybench(
    path: str | Path | None = None,
    split: str = "zh_subset",
) -> list[MCItem]:
    """SafetyBench (thu-coai), 7 safety categories.

    Splits: ``zh_subset`` (``test_zh_subset.json`` + ``test_answers_zh_subset.json``, 2,100
    items), ``dev_en`` / ``dev_zh`` (5 per category = 35, answers inline), ``test_en``
    (``test_en.json`` + ``test_answers_en.json``, 11,435 items; the questions file is not in
    the offline copy and must be supplied) and ``test_zh`` likewise. ``path`` is the folder.
    """
    if split not in SAFETYBENCH_SPLITS:
        raise ConfigError(
            f"safetybench: split must be one of {', '.join(SAFETYBENCH_SPLITS)}, not {split!r}"
        )
    p = _benchmark_dir("safetybench", path)
    folder = p.parent if p.is_file() else p
    if split.startswith("dev_"):
        return _sb_dev(folder / f"{split}.json", split)
    stem = split.removeprefix("test_")
    return _sb_test(folder / f"test_{stem}.json", folder / f"test_answers_{stem}.json", split)


# --------------------------------------------------------------------------- prompts


def load_xstest(path: str | Path | None = None) -> list[PromptItem]:
    """XSTest: 450 prompts, 250 ``safe`` (that look unsafe) and 200 ``unsafe`` contrasts.

    ``category`` is the prompt type (18 types); ``focus`` and ``note`` are in ``meta``.
    """
    p = _benchmark_dir("xstest", path)
    file = p if p.is_file() else p / "xstest_prompts.csv"
    cols = ("id", "prompt", "type", "label", "focus", "note")
    items = []
    for i, r in enumerate(_read_csv(file, "xstest", cols)):
        if r["label"] not in ("safe", "unsafe"):
            raise ConfigError(f"xstest: {file} row {i + 2} label must be safe/unsafe")
        label: PromptLabel = "safe" if r["label"] == "safe" else "unsafe"
        items.append(
            PromptItem(
                id=f"xstest/{r['id']}",
                benchmark="xstest",
                subset="prompts",
                prompt=r["prompt"],
                label=label,
                category=r["type"],
                meta=(("focus", r["focus"]), ("note", r["note"])),
            )
        )
    return items


def load_advbench(
    path: str | Path | None = None,
    split: Literal["behaviors", "strings", "all"] = "behaviors",
) -> list[PromptItem]:
    """AdvBench: 520 harmful behaviours (goal, target) and 574 harmful strings.

    For ``strings`` the prompt is the string the attack tries to elicit (also in ``target``).
    """
    if split not in ("behaviors", "strings", "all"):
        raise ConfigError(f"advbench: split must be behaviors/strings/all, not {split!r}")
    p = _benchmark_dir("advbench", path)
    folder = p.parent if p.is_file() else p
    items: list[PromptItem] = []
    if split in ("behaviors", "all"):
        rows = _read_csv(folder / "harmful_behaviors.csv", "advbench", ("goal", "target"))
        items += [
            PromptItem(
                id=f"advbench/behaviors/{i}",
                benchmark="advbench",
                subset="behaviors",
                prompt=r["goal"],
                label="harmful",
                target=r["target"],
            )
            for i, r in enumerate(rows)
        ]
    if split in ("strings", "all"):
        rows = _read_csv(folder / "harmful_strings.csv", "advbench", ("target",))
        items += [
            PromptItem(
                id=f"advbench/strings/{i}",
                benchmark="advbench",
                subset="strings",
                prompt=r["target"],
                label="harmful",
                target=r["target"],
            )
            for i, r in enumerate(rows)
        ]
    return items


def load_harmbench(
    path: str | Path | None = None,
    split: Literal["val", "test", "all"] = "test",
    functional: str | None = None,
) -> list[PromptItem]:
    """HarmBench text behaviours: 400 in all, val 80 (tuning), test 320 (reporting).

    ``category`` is the semantic category (``copyright`` is one); the functional category
    (standard / contextual / copyright) is ``meta["functional_category"]`` and can be filtered
    with ``functional``. Contextual behaviours carry their ``context`` string.
    """
    if split not in ("val", "test", "all"):
        raise ConfigError(f"harmbench: split must be val/test/all, not {split!r}")
    p = _benchmark_dir("harmbench", path)
    file = p if p.is_file() else p / f"harmbench_behaviors_text_{split}.csv"
    cols = (
        "Behavior",
        "FunctionalCategory",
        "SemanticCategory",
        "Tags",
        "ContextString",
        "BehaviorID",
    )
    items = []
    for r in _read_csv(file, "harmbench", cols):
        if functional is not None and r["FunctionalCategory"] != functional:
            continue
        tags = tuple(t.strip() for t in r["Tags"].split(",") if t.strip())
        items.append(
            PromptItem(
                id=f"harmbench/{r['BehaviorID']}",
                benchmark="harmbench",
                subset=split,
                prompt=r["Behavior"],
                label="harmful",
                category=r["SemanticCategory"],
                context=r["ContextString"] or None,
                tags=tags,
                meta=(("functional_category", r["FunctionalCategory"]),),
            )
        )
    return items


# --------------------------------------------------------------------------- registry

BENCHMARKS: dict[str, Callable[..., Sequence[Item]]] = {
    "hhh": load_hhh,
    "truthfulqa": load_truthfulqa,
    "safetybench": load_safetybench,
    "xstest": load_xstest,
    "advbench": load_advbench,
    "harmbench": load_harmbench,
}


MCBenchmark = Literal["hhh", "truthfulqa", "safetybench"]
PromptBenchmark = Literal["xstest", "advbench", "harmbench"]


@overload
def load(
    name: MCBenchmark,
    path: str | Path | None = ...,
    split: str | None = ...,
    subset: str | None = ...,
    **kwargs: Any,
) -> list[MCItem]: ...


@overload
def load(
    name: PromptBenchmark,
    path: str | Path | None = ...,
    split: str | None = ...,
    subset: str | None = ...,
    **kwargs: Any,
) -> list[PromptItem]: ...


@overload
def load(
    name: str,
    path: str | Path | None = ...,
    split: str | None = ...,
    subset: str | None = ...,
    **kwargs: Any,
) -> list[MCItem] | list[PromptItem]: ...


def load(
    name: str,
    path: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    **kwargs: Any,
) -> list[MCItem] | list[PromptItem]:
    """Load a benchmark by name.

    ``split``: truthfulqa mc1/mc2; safetybench zh_subset/dev_en/dev_zh/test_en/test_zh;
    advbench behaviors/strings/all; harmbench val/test/all. ``subset``: hhh's subset.
    Other keywords go to the loader (e.g. ``version="v1"`` for TruthfulQA).
    """
    loader = BENCHMARKS.get(name)
    if loader is None:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if split is not None:
        if name in ("hhh", "xstest"):
            raise ConfigError(f"{name}: takes no split")
        kwargs["split"] = split
    if subset is not None:
        if name != "hhh":
            raise ConfigError(f"{name}: takes no subset (hhh only)")
        kwargs["subset"] = subset
    try:
        return list(loader(path, **kwargs))  # type: ignore[return-value]
    except TypeError as exc:
        raise ConfigError(f"{name}: bad arguments {sorted(kwargs)} ({exc})") from exc


# --------------------------------------------------------------------------- sampling


def unit_hash(salt: str, seed: int, item_id: str) -> float:
    """A number in [0, 1) fixed by (salt, seed, id) alone."""
    digest = hashlib.sha256(f"{salt}\x00{seed}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_ids(items: Sequence[Item]) -> None:
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ConfigError("items: ids must be unique")


def subsample(items: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """``n`` items chosen by hashing ids with ``seed``, in their original order.

    Same seed and items -> same result, whatever the input order; smaller ``n`` gives a
    subset of a larger ``n`` (nested samples). ``n >= len(items)`` returns every item.
    """
    if n < 0:
        raise ConfigError(f"subsample: n must be >= 0, not {n}")
    _check_ids(items)
    if n >= len(items):
        return list(items)
    keep = set(sample_order(items, seed)[:n])
    return [it for i, it in enumerate(items) if i in keep]


def sample_order(items: Sequence[Item], seed: int = 0) -> list[int]:
    """Indices of ``items`` in the order :func:`subsample` draws them.

    The first ``k`` indices are ``subsample(items, k, seed)``, and the order of a sample
    agrees with the order of the pool it was drawn from, so a long run that works in this
    order completes every smaller nested sample on its way (and an interrupted run leaves a
    reportable one).
    """
    _check_ids(items)
    keys = np.array([unit_hash("subsample", seed, it.id) for it in items])
    return [int(i) for i in np.argsort(keys, kind="stable")]


@dataclass(frozen=True)
class Split(Generic[T]):
    """A dev/test partition (each in the original order)."""

    dev: tuple[T, ...]
    test: tuple[T, ...]


def split(
    items: Sequence[T],
    dev_fraction: float | None = None,
    *,
    n_dev: int | None = None,
    seed: int = 0,
    by: Callable[[T], str] | None = None,
    salt: str = "split",
) -> Split[T]:
    """Deterministic dev/test split by hashing ids with ``seed``.

    ``by`` hashes another key instead of the id (e.g. the question text, so that items that
    share a question stay on one side), with its own ``salt``.

    With ``dev_fraction`` an item goes to dev iff ``hash(seed, id) < dev_fraction``: its split
    never depends on which other items are loaded (the dev share is ``dev_fraction`` in
    expectation). With ``n_dev`` the ``n_dev`` items with the smallest hashes form dev: the size
    is exact, but membership is only stable while the loaded set stays the same.
    """
    if (dev_fraction is None) == (n_dev is None):
        raise ConfigError("split: give exactly one of dev_fraction and n_dev")
    _check_ids(items)
    keys = [unit_hash(salt, seed, by(it) if by else it.id) for it in items]
    if dev_fraction is not None:
        if not 0.0 <= dev_fraction <= 1.0:
            raise ConfigError(f"split: dev_fraction must be in [0, 1], not {dev_fraction}")
        in_dev = [k < dev_fraction for k in keys]
    else:
        assert n_dev is not None
        if not 0 <= n_dev <= len(items):
            raise ConfigError(f"split: n_dev must be in [0, {len(items)}], not {n_dev}")
        chosen = set(np.argsort(np.array(keys), kind="stable")[:n_dev].tolist())
        in_dev = [i in chosen for i in range(len(items))]
    return Split(
        dev=tuple(it for it, d in zip(items, in_dev, strict=True) if d),
        test=tuple(it for it, d in zip(items, in_dev, strict=True) if not d),
    )


def shuffle_options(items: Iterable[MCItem], seed: int = 0) -> list[MCItem]:
    """Each item's options in an order fixed by (seed, id): removes position patterns such as
    TruthfulQA listing the correct answer first."""
    out = []
    for it in items:
        digest = hashlib.sha256(f"shuffle\x00{seed}\x00{it.id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        order = rng.permutation(len(it.options)).tolist()
        out.append(
            MCItem(
                id=it.id,
                benchmark=it.benchmark,
                subset=it.subset,
                question=it.question,
                options=tuple(it.options[j] for j in order),
                labels=tuple(it.labels[j] for j in order),
                category=it.category,
            )
        )
    return out
