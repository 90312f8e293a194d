"""Benchmark loaders against the official files, plus split/subsample determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from safetygame.errors import ConfigError
from safetygame.eval import datasets as ds
from safetygame.eval.datasets import MCItem, PromptItem


@pytest.fixture(scope="module")
def root(benchmark_data: Path) -> Path:
    return benchmark_data


# --------------------------------------------------------------------------- counts


def test_hhh_counts_and_labels(root: Path) -> None:
    items = ds.load("hhh")
    assert len(items) == 221
    assert Counter(it.subset for it in items) == {
        "harmless": 58,
        "helpful": 59,
        "honest": 61,
        "other": 43,
    }
    assert all(isinstance(it, MCItem) and len(it.options) == 2 for it in items)
    assert all(it.n_correct == 1 for it in items)
    assert len(ds.load("hhh", subset="honest")) == 61
    # One subset's task.json can be given directly.
    assert len(ds.load("hhh", path=root / "hhh" / "other" / "task.json")) == 43


@pytest.mark.parametrize("version", ["v0", "v1"])
def test_truthfulqa_mc1_exactly_one_true(root: Path, version: str) -> None:
    items = ds.load("truthfulqa", split="mc1", version=version)
    assert len(items) == 817
    assert all(isinstance(it, MCItem) for it in items)
    for it in items:
        assert it.n_correct == 1
        assert it.labels[it.correct_index] == 1.0
    # Categories are joined from the CSV beside the JSON.
    assert sum(it.category is not None for it in items) >= 800


def test_truthfulqa_mc2_several_true(root: Path) -> None:
    items = ds.load("truthfulqa", split="mc2")
    assert len(items) == 817
    n_true = [it.n_correct for it in items]
    assert min(n_true) >= 1
    assert max(n_true) > 1
    with pytest.raises(ValueError, match="not exactly one"):
        next(it for it in items if it.n_correct > 1).correct_index  # noqa: B018
    # The same question keeps the same id across MC1 and MC2 (so splits agree).
    mc1 = ds.load("truthfulqa", split="mc1")
    assert [a.id for a in mc1] == [b.id for b in items]
    assert [a.question for a in mc1] == [b.question for b in items]


def test_truthfulqa_file_path_selects_version(root: Path) -> None:
    v1 = ds.load("truthfulqa", path=root / "truthfulqa" / "mc_task.json")
    v0 = ds.load("truthfulqa")
    assert len(v1) == len(v0) == 817
    assert [a.question for a in v0] != [b.question for b in v1]


def test_safetybench_zh_subset(root: Path) -> None:
    items = ds.load("safetybench", split="zh_subset")
    assert len(items) == 2100
    cats = Counter(it.category for it in items)
    assert len(cats) == 7
    assert set(cats.values()) == {300}
    for it in items:
        assert isinstance(it, MCItem)
        assert it.n_correct == 1
        assert 2 <= len(it.options) <= 4
    assert len({it.id for it in items}) == 2100


@pytest.mark.parametrize("split", ["dev_en", "dev_zh"])
def test_safetybench_dev(root: Path, split: str) -> None:
    items = ds.load("safetybench", split=split)
    assert len(items) == 35
    assert set(Counter(it.category for it in items).values()) == {5}
    assert all(isinstance(it, MCItem) and it.n_correct == 1 for it in items)


def test_xstest(root: Path) -> None:
    items = ds.load("xstest")
    assert len(items) == 450
    assert Counter(it.label for it in items) == {"safe": 250, "unsafe": 200}
    assert len({it.category for it in items}) == 18
    assert all(isinstance(it, PromptItem) and it.get("focus") is not None for it in items)


def test_advbench(root: Path) -> None:
    beh = ds.load("advbench")
    strings = ds.load("advbench", split="strings")
    assert (len(beh), len(strings)) == (520, 574)
    assert len(ds.load("advbench", split="all")) == 520 + 574
    assert all(it.label == "harmful" and it.target for it in beh)
    assert all(it.prompt == it.target for it in strings)


def test_harmbench(root: Path) -> None:
    val = ds.load("harmbench", split="val")
    test = ds.load("harmbench", split="test")
    every = ds.load("harmbench", split="all")
    assert (len(val), len(test), len(every)) == (80, 320, 400)
    ids_val, ids_test = {it.id for it in val}, {it.id for it in test}
    assert not ids_val & ids_test
    assert ids_val | ids_test == {it.id for it in every}
    contextual = [it for it in every if it.get("functional_category") == "contextual"]
    assert len(contextual) == 100
    assert all(it.context for it in contextual)
    assert all(it.context is None for it in every if it.get("functional_category") == "standard")
    assert sum(it.category == "copyright" for it in every) == 100
    assert len(ds.load_harmbench(split="all", functional="copyright")) == 100


def test_data_root_is_accepted_as_path(root: Path) -> None:
    assert len(ds.load("xstest", path=root)) == 450


# --------------------------------------------------------------------------- SafetyBench test_en


def _write_sb_test(folder: Path, answers: dict[str, dict[str, object]]) -> None:
    questions = [
        {"id": 0, "question": "Q0?", "options": ["Yes.", "No."], "category": "Offensiveness"},
        {
            "id": 7,
            "question": "Q7?",
            "options": ["a", "b", "c", "d"],
            "category": "Physical Health",
        },
    ]
    (folder / "test_en.json").write_text(json.dumps(questions), encoding="utf-8")
    (folder / "test_answers_en.json").write_text(json.dumps(answers), encoding="utf-8")


def test_safetybench_test_en_synthetic(tmp_path: Path) -> None:
    _write_sb_test(
        tmp_path,
        {
            "0": {"category": "Offensiveness", "answer": 1},
            "7": {"category": "Physical Health", "answer": 2},
        },
    )
    items = ds.load("safetybench", path=tmp_path, split="test_en")
    assert [it.id for it in items] == ["safetybench/test_en/0", "safetybench/test_en/7"]
    assert [it.correct_index for it in items] == [1, 2]
    assert [it.category for it in items] == ["Offensiveness", "Physical Health"]
    assert items[1].options == ("a", "b", "c", "d")


def test_safetybench_test_en_missing_answer(tmp_path: Path) -> None:
    _write_sb_test(tmp_path, {"0": {"category": "Offensiveness", "answer": 1}})
    with pytest.raises(ConfigError, match=r"test_answers_en\.json has no answer for question id 7"):
        ds.load("safetybench", path=tmp_path, split="test_en")


def test_safetybench_test_en_absent_names_file(root: Path) -> None:
    # The offline copy has the English answer key but not the questions.
    with pytest.raises(ConfigError, match=r"test_en\.json not found \(expected a JSON list"):
        ds.load("safetybench", split="test_en")


# --------------------------------------------------------------------------- errors


def test_missing_file_names_file_and_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        ds.load("hhh", path=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "harmless" / "task.json") in msg
    assert "target_scores" in msg


def test_malformed_json(tmp_path: Path) -> None:
    bad = tmp_path / "test_zh_subset.json"
    bad.write_text('{"Offensiveness": []}', encoding="utf-8")
    (tmp_path / "test_answers_zh_subset.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        ds.load("safetybench", path=tmp_path)
    assert str(bad) in str(err.value)
    assert "JSON list of {id" in str(err.value)


def test_invalid_json_text(tmp_path: Path) -> None:
    bad = tmp_path / "mc_task_v0.json"
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ds.load("truthfulqa", path=tmp_path)


def test_truthfulqa_mc1_with_two_true_is_rejected(tmp_path: Path) -> None:
    row = {"question": "q", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1, "b": 1}}
    (tmp_path / "mc_task_v0.json").write_text(json.dumps([row]), encoding="utf-8")
    with pytest.raises(ConfigError, match="has 2 true mc1_targets"):
        ds.load("truthfulqa", path=tmp_path)
    assert ds.load("truthfulqa", path=tmp_path, split="mc2")[0].n_correct == 2


def test_csv_missing_column(tmp_path: Path) -> None:
    bad = tmp_path / "xstest_prompts.csv"
    bad.write_text("id,prompt,label\n1,hi,safe\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        ds.load("xstest", path=tmp_path)
    assert str(bad) in str(err.value)
    assert "type" in str(err.value)


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ConfigError, match="unknown benchmark"):
        ds.load("mmlu")
    with pytest.raises(ConfigError, match="split must be"):
        ds.load("harmbench", split="train")
    with pytest.raises(ConfigError, match="takes no split"):
        ds.load("hhh", split="test")
    with pytest.raises(ConfigError, match="subset must be one of"):
        ds.load("hhh", subset="funny")


def test_env_var_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ds.DATA_ENV, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="SAFETYGAME_DATA"):
        ds.data_root()


def test_env_var_is_used(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ds.DATA_ENV, str(root))
    monkeypatch.chdir(tmp_path)  # the working directory no longer helps
    assert ds.data_root() == root
    assert len(ds.load("advbench")) == 520


# --------------------------------------------------------------------------- split & subsample


def _mc(n: int) -> list[MCItem]:
    return [MCItem(f"x/{i}", "x", "s", f"q{i}", ("a", "b"), (1.0, 0.0), None) for i in range(n)]


def test_split_deterministic_disjoint_and_complete() -> None:
    items = _mc(500)
    s1 = ds.split(items, 0.3, seed=4)
    s2 = ds.split(items, 0.3, seed=4)
    assert s1 == s2
    dev, test = {it.id for it in s1.dev}, {it.id for it in s1.test}
    assert not dev & test
    assert dev | test == {it.id for it in items}
    # Binomial(500, 0.3): mean 150, sd ~10.2; 5 sd either way.
    assert 99 <= len(dev) <= 201
    # Order is preserved inside each part.
    pos = {it.id: i for i, it in enumerate(items)}
    assert [pos[it.id] for it in s1.dev] == sorted(pos[it.id] for it in s1.dev)
    assert ds.split(items, 0.3, seed=5).dev != s1.dev


def test_split_membership_independent_of_other_items() -> None:
    items = _mc(400)
    full = ds.split(items, 0.25, seed=1)
    part = ds.split(items[::3][::-1], 0.25, seed=1)
    full_dev = {it.id for it in full.dev}
    assert {it.id for it in part.dev} == {it.id for it in items[::3]} & full_dev


def test_split_n_dev_exact() -> None:
    items = _mc(100)
    s = ds.split(items, n_dev=17, seed=2)
    assert len(s.dev) == 17 and len(s.test) == 83
    with pytest.raises(ConfigError, match="exactly one"):
        ds.split(items, 0.1, n_dev=3)
    with pytest.raises(ConfigError, match="ids must be unique"):
        ds.split([*items, items[0]], 0.5)


def test_subsample_stable_nested_and_ordered() -> None:
    items = _mc(300)
    a = ds.subsample(items, 40, seed=9)
    assert a == ds.subsample(items, 40, seed=9)
    assert len(a) == 40
    pos = {it.id: i for i, it in enumerate(items)}
    assert [pos[it.id] for it in a] == sorted(pos[it.id] for it in a)
    assert {it.id for it in ds.subsample(items, 20, seed=9)} <= {it.id for it in a}
    assert {it.id for it in ds.subsample(items[::-1], 40, seed=9)} == {it.id for it in a}
    assert ds.subsample(items, 40, seed=10) != a
    assert ds.subsample(items, 1000, seed=0) == items


def test_sample_order_completes_nested_samples_first() -> None:
    items = _mc(300)
    order = ds.sample_order(items, seed=9)
    assert sorted(order) == list(range(300))
    for k in (1, 20, 40, 299):
        assert [items[i] for i in sorted(order[:k])] == ds.subsample(items, k, seed=9)
    # a sample is worked in the pool's order: its first k are the pool's first k
    sample = ds.subsample(items, 120, seed=9)
    head = [sample[i].id for i in ds.sample_order(sample, seed=9)[:40]]
    assert sorted(head) == sorted(it.id for it in ds.subsample(items, 40, seed=9))
    with pytest.raises(ConfigError, match="ids must be unique"):
        ds.sample_order([*items, items[0]])


def test_shuffle_options_keeps_pairs(root: Path) -> None:
    items = ds.load("truthfulqa")
    shuffled = ds.shuffle_options(items, seed=3)
    assert shuffled == ds.shuffle_options(items, seed=3)
    for a, b in zip(items, shuffled, strict=True):
        assert dict(zip(a.options, a.labels, strict=True)) == dict(
            zip(b.options, b.labels, strict=True)
        )
    # The release puts the true MC1 answer first; after shuffling it is spread out.
    assert all(it.correct_index == 0 for it in items)
    first = Counter(it.correct_index for it in shuffled)
    assert first[0] < 0.5 * len(items)
