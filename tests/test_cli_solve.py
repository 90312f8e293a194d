"""The ``safetygame solve`` and ``safetygame bench solver`` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from safetygame.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(args: list[str], stdin: str | None = None) -> Any:
    return CliRunner().invoke(main, args, input=stdin)


def test_chemistry_example_mixes_two_candidates() -> None:
    res = run(["solve", str(EXAMPLES / "chemistry.json"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["success"] and out["status"] == 0
    assert len(out["support"]) == 2
    assert all(0.0 < out["strategy"][i] < 1.0 for i in out["support"])
    assert out["expected_risk"][0] == pytest.approx(0.2)
    assert out["budget"] == [0.2]
    assert len(out["labels"]) == 5 and out["categories"] is None


def test_table_output() -> None:
    res = run(["solve", str(EXAMPLES / "chemistry.json")])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for word in ("label", "Delta", "pi", "value (pi.M)", "expected risk", "multiplier", "status"):
        assert word in text
    assert "refusal" in text and "optimal: mix of candidates" in text


def test_multi_budget_example() -> None:
    res = run(["solve", str(EXAMPLES / "multi_budget.json"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    doc = json.loads((EXAMPLES / "multi_budget.json").read_text())
    assert out["categories"] == list(doc["harm"])
    budgets = [doc["budget"][c] for c in out["categories"]]
    assert out["budget"] == budgets
    assert all(r <= b + 1e-9 for r, b in zip(out["expected_risk"], budgets, strict=True))
    assert len(out["multiplier"]) == len(budgets)
    table = run(["solve", str(EXAMPLES / "multi_budget.json")]).stdout
    for c in out["categories"]:
        assert f"Delta[{c}]" in table and f"expected risk [{c}]" in table


def test_stdin_and_options() -> None:
    doc = {
        "helpfulness": [0.1, 0.6, 0.9],
        "harm": [0.0, 0.1, 0.5],
        "budget": 0.2,
        "beta": 2.0,
        "temperature": 0.05,
        "labels": ["no", "ok", "risky"],
    }
    res = run(["solve", "-", "--json"], stdin=json.dumps(doc))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["solver"] == "exact-soft"
    assert out["labels"] == ["no", "ok", "risky"]
    hard_doc = {**doc, "beta": None, "temperature": None}
    hard = run(["solve", "-", "--json"], stdin=json.dumps(hard_doc))
    assert json.loads(hard.stdout)["solver"] == "exact-hull"
    highs = run(["solve", "-", "--json"], stdin=json.dumps({**hard_doc, "method": "highs"}))
    assert json.loads(highs.stdout)["value"] == pytest.approx(json.loads(hard.stdout)["value"])


GOOD = {"helpfulness": [0.1, 0.6], "harm": [0.0, 0.1], "budget": 0.2}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must be a JSON object"),
        (json.dumps({"harm": [0.0], "budget": 0.1}), "missing field 'helpfulness'"),
        (json.dumps({**GOOD, "budget": -0.1}), "budget must be >= 0"),
        (json.dumps({**GOOD, "harm": [0.0, 1.5]}), "harm[1] must be in [0, 1]"),
        (json.dumps({**GOOD, "harm": [0.0, "x"]}), "harm[1] must be a number"),
        (json.dumps({**GOOD, "harm": [0.0]}), "harm has 1 entries but helpfulness has 2"),
        (json.dumps({**GOOD, "colour": "red"}), "unknown field 'colour'"),
        (json.dumps({**GOOD, "refusal": 5}), "refusal index 5 is out of range"),
        (json.dumps({**GOOD, "epsilon": -1}), "epsilon must be >= 0"),
        (json.dumps({**GOOD, "method": "simplex"}), "method must be"),
        ('{"helpfulness": [0.1, NaN], "harm": [0, 0.1], "budget": 0.2}', "helpfulness[1] is NaN"),
        (
            json.dumps({**GOOD, "harm": {"a": [0.0, 0.1]}, "budget": {"b": 0.1}}),
            "budget.b has no matching harm category",
        ),
        (
            json.dumps({**GOOD, "harm": {"a": [0.0, 0.1], "b": [0.0, 0.2]}, "budget": {"a": 0.1}}),
            "budget.b is missing",
        ),
        (json.dumps({**GOOD, "budget": {"a": 0.1}}), "budget is per category"),
    ],
)
def test_malformed_input_is_one_line_exit_2(text: str, needle: str) -> None:
    res = run(["solve", "-"], stdin=text)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_missing_file_is_exit_2(tmp_path: Path) -> None:
    res = run(["solve", str(tmp_path / "nope.json")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1


def test_bench_solver_small() -> None:
    res = run(["bench", "solver", "--instances", "3", "--batch-prompts", "3000", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("speedup_vs_highs", "batched_prompts_per_s", "max_abs_value_diff", "per_m"):
        assert key in out
    assert set(out["per_m"]) == {"4", "8", "16", "64"}
    assert out["max_abs_value_diff"] <= 1e-9
    assert out["speedup_vs_highs"] > 1.0 and out["batched_prompts_per_s"] > 0.0
    text = run(["bench", "solver", "--instances", "2", "--batch-prompts", "1000"])
    assert text.exit_code == 0 and "batched" in text.stdout
