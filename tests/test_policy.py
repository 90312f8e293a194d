from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safetygame.errors import ConfigError
from safetygame.policy import load_policy, policy_from_dict, policy_yaml


def _default_dict() -> dict:
    return yaml.safe_load(policy_yaml(load_policy()))


def test_default_policy_loads_and_round_trips(tmp_path: Path) -> None:
    p = load_policy()
    assert p.id == "default"
    assert p.budgets == {"harm": p.game.budget}
    f = tmp_path / "policy.yml"
    f.write_text(policy_yaml(p))
    assert load_policy(f) == p
    assert load_policy(tmp_path) == p  # a folder holding policy.yml
    assert load_policy(f).digest == p.digest


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("game", "budget"), -0.1, "game.budget"),
        (("game", "budget"), float("nan"), "game.budget"),
        (("game", "epsilon"), 2.0, "game.epsilon"),
        (("game", "choose"), "maximise", "game.choose"),
        (("sampling", "n"), 0, "sampling.n"),
        (("probes", "harm", "question"), "", "probes.harm.question"),
        (("game", "surprise"), 1, "game.surprise"),
        (("game", "temperature"), 0.1, "game"),
    ],
)
def test_invalid_fields_are_named(path: tuple[str, ...], value: object, field: str) -> None:
    data = _default_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=rf"Invalid policy .*{field.replace('.', '[.]')}"):
        policy_from_dict(data)


def test_categories_add_budgets_and_must_be_unique() -> None:
    data = _default_dict()
    data["categories"] = [
        {"name": "medical", "question": "Does it give individual dosing advice?", "budget": 0.05}
    ]
    p = policy_from_dict(data)
    assert p.budgets == {"harm": p.game.budget, "medical": 0.05}
    data["categories"].append(dict(data["categories"][0]))
    with pytest.raises(ConfigError, match="unique"):
        policy_from_dict(data)


def test_digest_changes_with_any_rule() -> None:
    p = load_policy()
    assert p.with_budget(0.05).digest != p.digest
    assert p.with_budget(p.game.budget).digest == p.digest
    with pytest.raises(ConfigError, match=r"game\.budget"):
        p.with_budget(-1.0)


def test_missing_unknown_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="Unknown policy"):
        load_policy("no-such-policy")
    bad = tmp_path / "bad.yml"
    bad.write_text("id: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_policy(bad)
    # PyYAML keeps the last of two equal keys; a policy must not lose a rule that way
    bad.write_text("id: dup\ngame:\n  budget: 0.1\n  budget: 0.5\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'budget' \(first at line 3\)"):
        load_policy(bad)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[1] / "examples" / "policies").glob("*.yml")),
    ids=lambda p: p.name,
)
def test_example_policies_are_valid_and_name_known_scorers(path: Path) -> None:
    from safetygame.heads import load_head
    from safetygame.scorers import DESIGNS

    pol = load_policy(path)
    assert pol.id == path.stem
    for kind, name in (("helpfulness", pol.scorers.helpfulness), ("harm", pol.scorers.harm)):
        if name.startswith("head:"):  # a head artefact: it must load, for this probe
            assert load_head(name[len("head:") :]).kind == kind
        else:
            assert name in DESIGNS
