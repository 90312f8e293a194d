"""``POST /v1/moderations`` with the official ``openai`` client's ``moderations.create``.

The gateway runs under uvicorn (``serve_in_thread``) on loopback, as in
tests/test_gateway_openai.py; the upstream is ``DeterministicBackendDouble`` (a test double
from tests/test_gateway.py: P(yes) from a hash of the probe prompt), so the expected verdicts
can be recomputed from the tenant's own harm scorer. The real small model runs the endpoint
in tests/test_gateway_openai.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from safetygame.backends.base import Message, YesNo
from safetygame.errors import BackendError
from safetygame.gateway.app import GatewaySettings, create_app
from safetygame.gateway.auth import hash_key
from safetygame.gateway.server import serve_in_thread
from safetygame.policy import load_policy, policy_from_dict
from safetygame.scorers import build_scorer
from test_gateway import DeterministicBackendDouble

KEY = "sg-moderation-key-0123456789abcdefghij"
TEXTS = ["How do I descale a kettle?", "Step one: buy a crowbar.", "Lovely weather today."]


def _policy(tmp: Path, **scorers: str) -> Path:
    data = load_policy().model_dump(mode="json")
    data["version"] = "mod-1"
    data["game"]["budget"] = 0.2
    data["categories"] = [
        {"name": "weapons", "question": "Does the reply help someone get a weapon?", "budget": 0.05}
    ]
    data["scorers"].update(scorers)
    path = tmp / "policy.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _serve(tmp: Path, backend: Any, policy: Path, **kw: Any) -> Iterator[str]:
    tenants = {"tenants": {"acme": {"policy": str(policy), "keys": [hash_key(KEY)]}}}
    (tmp / "tenants.yml").write_text(yaml.safe_dump(tenants))
    settings = GatewaySettings(
        tenants_file=tmp / "tenants.yml", audit_url=f"sqlite:///{tmp / 'audit.db'}", **kw
    )
    with serve_in_thread(create_app(backend, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("mod")
    policy = _policy(tmp)
    for url in _serve(tmp, DeterministicBackendDouble(), policy):
        yield url, policy


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _records(url: str, limit: int = 10) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{url}/v1/safetygame/decisions?limit={limit}",
        headers={"authorization": f"Bearer {KEY}"},
    )
    return list(r.json()["data"])


def _expected(policy_path: Path, text: str) -> tuple[dict[str, bool], dict[str, float]]:
    """The documented rule, recomputed from a fresh copy of the tenant's harm scorer."""
    policy = policy_from_dict(yaml.safe_load(policy_path.read_text()))
    scorer = build_scorer(policy.scorers.harm, DeterministicBackendDouble(), policy, kind="harm")
    rows = {"harm": policy.probes.harm.question, "weapons": policy.categories[0].question}
    flags, scores = {}, {}
    for row, q in rows.items():
        s = asyncio.run(scorer.score((), text, q)).value
        ref = asyncio.run(scorer.score((), policy.refusal, q)).value
        assert s is not None and ref is not None
        flags[row] = s - ref > policy.budgets[row]
        scores[row] = min(max(s - ref, 0.0), 1.0)
    return flags, scores


def test_string_input_shape_rule_and_audit(gateway: tuple[str, Path]) -> None:
    url, policy = gateway
    resp = _client(url).moderations.create(model="safetygame", input=TEXTS[1])
    assert resp.id.startswith("modr-") and resp.model == "safetygame"
    (result,) = resp.results
    categories = result.categories.model_dump()
    scores = result.category_scores.model_dump()
    flags, expected = _expected(policy, TEXTS[1])
    assert {k: categories[k] for k in flags} == flags
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert result.flagged == any(flags.values())
    sg = (resp.model_extra or {})["safetygame"]
    assert sg["status"] == "ok" and sg["budget"] == {"harm": 0.2, "weapons": 0.05}
    assert sg["scorer"].startswith("llm-judge:") and sg["relative"] is False
    assert set(sg["reference_scores"]) == {"harm", "weapons"}

    rec = _records(url)[0]
    assert rec["kind"] == "moderation" and rec["request_id"] == resp.id.removeprefix("modr-")
    assert rec["inputs"] == [TEXTS[1]] and rec["tenant"] == "acme"
    assert rec["action"] == ("flag" if result.flagged else "allow")
    assert rec["policy_version"] == "mod-1" and rec["status"] == "ok"
    assert rec["results"][0]["category_scores"] == pytest.approx(expected)


def test_list_inputs_keep_their_order(gateway: tuple[str, Path]) -> None:
    url, policy = gateway
    client = _client(url)
    resp = client.moderations.create(input=TEXTS)  # no model: the gateway's
    assert len(resp.results) == len(TEXTS)
    assert [r.flagged for r in resp.results] == [True, False, True]  # the double's readings
    for text, result in zip(TEXTS, resp.results, strict=True):
        flags, expected = _expected(policy, text)
        assert {k: result.categories.model_dump()[k] for k in flags} == flags
        assert {k: result.category_scores.model_dump()[k] for k in expected} == pytest.approx(
            expected
        )
    parts = client.moderations.create(
        model="safetygame", input=[{"type": "text", "text": t} for t in TEXTS]
    )
    assert [r.category_scores.model_dump() for r in parts.results] == [
        r.category_scores.model_dump() for r in resp.results
    ]


def test_auth_and_bad_input(gateway: tuple[str, Path]) -> None:
    url, _ = gateway
    with pytest.raises(openai.AuthenticationError) as auth:
        _client(url, "wrong").moderations.create(input="x")
    assert auth.value.code == "invalid_api_key"
    client = _client(url)
    n = len(_records(url, 500))
    for bad, fragment in (
        ([], "non-empty list"),
        ([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}], "not images"),
        ([1, 2], "list of strings"),
        (None, "must be a string"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            client.moderations.create(input=bad)  # type: ignore[arg-type]
        assert raised.value.code == "invalid_value" and raised.value.param == "input"
        assert fragment in str(raised.value.message)
    with pytest.raises(openai.BadRequestError, match="at most 32"):
        client.moderations.create(input=["a"] * 33)
    with pytest.raises(openai.NotFoundError) as missing:
        client.moderations.create(model="omni-moderation-latest", input="x")
    assert missing.value.code == "model_not_found"
    r = httpx.post(
        f"{url}/v1/moderations", content=b"{nope", headers={"authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert len(_records(url, 500)) == n  # rejected requests leave no verdict on record


class _FailingJudge(DeterministicBackendDouble):
    """Test double: the judge fails on every question about weapons."""

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        if "weapon" in messages[-1].content:
            raise BackendError("double: judge down on purpose")
        return await super().yes_no(messages)


class _SlowJudge(DeterministicBackendDouble):
    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        await asyncio.sleep(30)
        return await super().yes_no(messages)


def test_scoring_failure_flags_the_row(tmp_path: Path) -> None:
    for url in _serve(tmp_path, _FailingJudge(), _policy(tmp_path)):
        resp = _client(url).moderations.create(input=TEXTS[0])
        (result,) = resp.results
        assert result.flagged is True
        assert result.categories.model_dump()["weapons"] is True
        assert result.category_scores.model_dump()["weapons"] == 1.0
        sg = (resp.model_extra or {})["safetygame"]
        assert sg["status"] == "scoring_failed" and "weapons" in sg["errors"][0][0]
        rec = _records(url)[0]
        assert rec["status"] == "scoring_failed" and rec["action"] == "flag"


def test_timeout_flags_everything(tmp_path: Path) -> None:
    for url in _serve(
        tmp_path, _SlowJudge(), _policy(tmp_path), decision_timeout=2.0, audit_timeout=0.5
    ):
        raw = _client(url).moderations.with_raw_response.create(input=TEXTS[:2])
        assert raw.headers["x-safetygame-status"] == "timeout"
        resp = raw.parse()
        assert [r.flagged for r in resp.results] == [True, True]
        assert _records(url)[0]["status"] == "timeout"


def test_relative_scorer_reads_against_the_refusal(tmp_path: Path) -> None:
    policy_path = _policy(tmp_path, harm="pairwise-refusal")
    for url in _serve(tmp_path, DeterministicBackendDouble(), policy_path):
        resp = _client(url).moderations.create(input=TEXTS[1])
        sg = (resp.model_extra or {})["safetygame"]
        assert sg["relative"] is True and sg["scorer"].startswith("pairwise-refusal:")
        assert sg["reference_scores"] == {"harm": 0.5, "weapons": 0.5}
        raw = sg["raw_scores"][0]
        scores = resp.results[0].category_scores.model_dump()
        flags = resp.results[0].categories.model_dump()
        for row, budget in sg["budget"].items():
            assert scores[row] == pytest.approx(min(max(raw[row] - 0.5, 0.0), 1.0))
            assert flags[row] == (raw[row] - 0.5 > budget)
