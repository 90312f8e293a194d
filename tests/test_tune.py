"""The traffic-level budget's calibration (safetygame.tune) and ``safetygame tune``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from safetygame.cli import main
from safetygame.errors import ConfigError
from safetygame.policy import load_policy, policy_yaml
from safetygame.tune import read_scored, traffic_notice, tune_price, write_policy

# Prompt 0 buys 0.8 helpfulness per unit of risk, prompt 1 only 0.1 (tests/test_game.py).
RAW = [
    {"helpfulness": [0.1, 0.26], "harm": [0.0, 0.2]},
    {"helpfulness": [0.1, 0.12], "harm": [0.0, 0.2]},
]


def decision_line(h: list[float], d: list[float], status: str = "ok") -> dict[str, object]:
    """A decision record as ``ask --json`` prints it (the refusal first here, but any place)."""
    cands = [
        {"text": f"t{i}", "is_refusal": i == 0, "helpfulness": hi, "harm": {"harm": di}}
        for i, (hi, di) in enumerate(zip(h, d, strict=True))
    ]
    return {"status": status, "candidates": cands[::-1]}


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def policy_file(tmp_path: Path, budget: float = 0.1) -> Path:
    data = load_policy().model_dump(mode="json")
    data["game"]["budget"] = budget
    p = tmp_path / "policy.yml"
    from safetygame.policy import policy_from_dict

    p.write_text(policy_yaml(policy_from_dict(data)), encoding="utf-8")
    return p


def test_the_three_formats_read_the_same_scores(tmp_path: Path) -> None:
    raw = read_scored(write_jsonl(tmp_path / "raw.jsonl", RAW))
    dec_rows = [decision_line(r["helpfulness"], r["harm"]) for r in RAW]  # type: ignore[arg-type]
    dec = read_scored(write_jsonl(tmp_path / "dec.jsonl", [*dec_rows, {"status": "timeout"}]))
    log = {
        "version": 1,
        "config": {"benchmark": "xstest"},
        "items": [
            {"split": "dev", "status": "ok", **decision_line([0.1, 0.26], [0.0, 0.2])},
            {"split": "dev", "status": "ok", **decision_line([0.1, 0.12], [0.0, 0.2])},
            {"split": "test", "status": "ok", **decision_line([0.1, 0.9], [0.0, 0.9])},
        ],
    }
    (tmp_path / "evallog.json").write_text(json.dumps(log), encoding="utf-8")
    ev = read_scored(tmp_path / "evallog.json")
    assert raw.helpfulness == dec.helpfulness == ev.helpfulness
    assert raw.harm == dec.harm == ev.harm
    assert dec.skipped == 1 and "dev split" in ev.source


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"bad\.jsonl:2: not JSON"),
        ('{"helpfulness": [0.1, 2.0], "harm": [0, 0]}', r"bad\.jsonl:2\.helpfulness\[1\]"),
        ('{"helpfulness": [0.1, 0.2], "harm": [0]}', r"bad\.jsonl:2\.harm must be a list"),
        ('{"candidates": [{"is_refusal": false}]}', r"bad\.jsonl:2\.candidates"),
        ('{"prompt": "hi"}', r"bad\.jsonl:2: expected"),
    ],
)
def test_malformed_input_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(RAW[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        read_scored(p)


def test_tune_sets_the_price_and_keeps_the_dev_mean_within_budget(tmp_path: Path) -> None:
    scored = read_scored(write_jsonl(tmp_path / "raw.jsonl", RAW))
    res = tune_price(load_policy(policy_file(tmp_path)), scored)
    assert res.calibration.price == pytest.approx(0.1)
    assert res.calibration.mean_risk <= 0.1 + 1e-12
    g = res.policy.game
    assert g.scope == "traffic" and g.price_of_risk is not None
    assert g.price_of_risk.value == pytest.approx(0.1) and g.price_of_risk.n == 2
    assert traffic_notice(res.policy) is not None and traffic_notice(load_policy()) is None


def test_write_policy_replaces_whole_files_only(tmp_path: Path) -> None:
    target = policy_file(tmp_path)
    res = tune_price(load_policy(target), read_scored(write_jsonl(tmp_path / "r.jsonl", RAW)))
    write_policy(res.policy, tmp_path)  # a folder: its policy.yml
    assert load_policy(target).game.scope == "traffic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.yml", "r.jsonl"]


def test_cli_tune_json_and_clean_errors(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "raw.jsonl", RAW)
    pol = policy_file(tmp_path)
    runner = CliRunner()
    out = runner.invoke(main, ["tune", "--from", str(src), "--policy", str(pol), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["price_of_risk"] == pytest.approx(0.1) and info["n"] == 2
    assert info["dev_mean_risk"] <= info["budget"] + 1e-12
    assert load_policy(pol).game.price_of_risk is not None
    # A shipped policy is never overwritten: --out is required.
    bad = runner.invoke(main, ["tune", "--from", str(src)])
    assert bad.exit_code == 2 and "--out" in bad.output
    # Malformed input: exit 2, the file named, and the policy left as it was.
    before = pol.read_text(encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"helpfulness": [0.1], "harm": [0.0]}\n', encoding="utf-8")
    err = runner.invoke(main, ["tune", "--from", str(broken), "--policy", str(pol)])
    assert err.exit_code == 2 and "broken.jsonl:1.helpfulness" in err.output
    assert pol.read_text(encoding="utf-8") == before


def test_a_tuned_budget_and_beta_go_through_the_policy_copy() -> None:
    from safetygame.eval.stats import BudgetChoice
    from safetygame.tune import _tuned_policy

    def choice(budget: float, beta: float | None) -> BudgetChoice:
        return BudgetChoice(
            budget=budget, beta=beta, score=0.0, score_ci=(0.0, 0.0), adopted=True, reason="",
            best=(budget, beta), best_score=0.0, current=(0.1, None), current_score=0.0,
            gain=None, budget_ci=(budget, budget), n=1, grid=(),
        )  # fmt: skip

    soft = load_policy().with_game(beta=2.0, temperature=0.05)
    assert _tuned_policy(soft, choice(0.05, 4.0), False).game.model_dump() == {
        **soft.game.model_dump(), "budget": 0.05,
    }  # fmt: skip
    tuned = _tuned_policy(soft, choice(0.05, 4.0), True).game
    assert (tuned.budget, tuned.beta, tuned.temperature) == (0.05, 4.0, 0.05)
    hard = _tuned_policy(soft, choice(0.08, None), True).game  # no soft cap left to smooth
    assert (hard.budget, hard.beta, hard.temperature) == (0.08, None, None)
    with pytest.raises(ConfigError, match="budget"):
        _tuned_policy(soft, choice(-1.0, None), True)  # validated as a whole, like with_budget
