"""Acceptance: the official ``openai`` client, unchanged, against the gateway served by
uvicorn, with the real SmolLM2-135M (llama.cpp) as the upstream model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from safetygame.backends.llamacpp import EmbeddedLlamaBackend
from safetygame.gateway.app import GatewaySettings, create_app
from safetygame.gateway.auth import hash_key
from safetygame.gateway.server import serve_in_thread
from safetygame.policy import load_policy

pytestmark = pytest.mark.model

KEY = "sg-acceptance-key-0123456789abcdefghij"


@contextlib.contextmanager
def serve_gateway(backend: EmbeddedLlamaBackend, root: Path, **settings: Any) -> Iterator[str]:
    """A one-tenant gateway (key ``KEY``) on the small model with a fast policy (m = 2, 16
    tokens), its files and audit log under ``root``."""
    data = load_policy().model_dump(mode="json")
    data.update(version="accept-1")
    data["sampling"].update(n=2, max_tokens=16)  # a fast game on the small model
    (root / "policy.yml").write_text(yaml.safe_dump(data))
    tenants = {"tenants": {"acme": {"policy": "policy.yml", "keys": [hash_key(KEY)]}}}
    (root / "tenants.yml").write_text(yaml.safe_dump(tenants))
    config = GatewaySettings(
        tenants_file=root / "tenants.yml",
        audit_url=f"sqlite:///{root / 'audit.db'}",
        decision_timeout=600,  # a shared 2-core machine can be slow; the test checks answers
        **settings,
    )
    with serve_in_thread(create_app(backend, config)) as url:
        yield url


@pytest.fixture(scope="module")
def gateway(
    smollm2_backend: EmbeddedLlamaBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("gw")
    with serve_gateway(smollm2_backend, root) as url:
        yield url, root


@pytest.fixture
def client(gateway: tuple[str, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway[0]}/v1", api_key=KEY, max_retries=0, timeout=900)


def _records(url: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{url}/v1/safetygame/decisions?limit=10", headers={"authorization": f"Bearer {KEY}"}
    )
    return list(r.json()["data"])


def test_openai_client_non_streaming(client: openai.OpenAI, gateway: tuple[str, Path]) -> None:
    assert [m.id for m in client.models.list().data] == ["safetygame"]
    resp = client.chat.completions.create(
        model="safetygame",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"safetygame": {"budget": 0.05, "seed": 7}},
    )
    text = resp.choices[0].message.content
    assert isinstance(text, str) and text
    sg = (resp.model_extra or {})["safetygame"]
    assert sg["status"] == "ok" and sg["policy_version"] == "accept-1"
    assert sg["budget"]["harm"] == pytest.approx(0.05)
    assert len(sg["strategy"]) == 3 and sum(sg["strategy"]) == pytest.approx(1.0)
    rec = _records(gateway[0])[0]
    assert rec["request_id"] == resp.id.removeprefix("chatcmpl-")
    assert rec["chosen_text"] == text and rec["model_id"].startswith("smollm2-135m")
    assert rec["candidates"][sg["chosen_index"]]["text"] == text


def test_openai_client_streaming(client: openai.OpenAI, gateway: tuple[str, Path]) -> None:
    stream = client.chat.completions.create(
        model="safetygame",
        messages=[{"role": "user", "content": "Name a fruit that is yellow."}],
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(final) == 1
    sg = (final[0].model_extra or {})["safetygame"]
    assert sg["status"] == "ok"
    rec = _records(gateway[0])[0]
    assert rec["stream"] is True and rec["chosen_text"] == text


def test_openai_client_errors(gateway: tuple[str, Path]) -> None:
    bad = openai.OpenAI(base_url=f"{gateway[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.chat.completions.create(model="safetygame", messages=[{"role": "user", "content": "x"}])
    assert auth.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=f"{gateway[0]}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        good.chat.completions.create(
            model="safetygame",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"safetygame": {"budget": 0.9}},
        )
    assert raised.value.param == "safetygame.budget"


def test_openai_client_moderations(client: openai.OpenAI, gateway: tuple[str, Path]) -> None:
    """``moderations.create`` scored by the small model's own harm probe (policy ``self``)."""
    texts = ["What is the capital of France?", "Explain how to make a pipe bomb at home."]
    resp = client.moderations.create(model="safetygame", input=texts)
    assert resp.id.startswith("modr-") and len(resp.results) == 2
    sg = (resp.model_extra or {})["safetygame"]
    assert sg["status"] == "ok" and sg["scorer"].startswith("llm-judge:smollm2-135m")
    budget = sg["budget"]["harm"]
    for result, raw in zip(resp.results, sg["raw_scores"], strict=True):
        score = result.category_scores.model_dump()["harm"]
        assert 0.0 <= raw["harm"] <= 1.0
        assert score == pytest.approx(max(raw["harm"] - sg["reference_scores"]["harm"], 0.0))
        assert result.categories.model_dump()["harm"] == (score > budget) == result.flagged
    rec = _records(gateway[0])[0]
    assert rec["kind"] == "moderation" and rec["inputs"] == texts
    assert rec["request_id"] == resp.id.removeprefix("modr-")


@pytest.fixture(scope="module")
def keepalive_gateway(
    smollm2_backend: EmbeddedLlamaBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The same gateway with keep-alives from the first 10 ms: every streamed decision here
    takes longer, so its headers go out before the decision and comments fill the wait."""
    with serve_gateway(
        smollm2_backend, tmp_path_factory.mktemp("gw_keepalive"), stream_keepalive=0.01
    ) as url:
        yield url


def test_openai_client_streams_through_keepalives(keepalive_gateway: str) -> None:
    client = openai.OpenAI(
        base_url=f"{keepalive_gateway}/v1", api_key=KEY, max_retries=0, timeout=900
    )
    raw = client.chat.completions.with_raw_response.create(
        model="safetygame",
        messages=[{"role": "user", "content": "Name a colour of the rainbow."}],
        stream=True,
        max_tokens=12,
    )
    assert raw.headers["x-safetygame-stream"] == "keepalive"  # headers before the decision
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(final) == 1
    sg = (final[0].model_extra or {})["safetygame"]
    assert sg["status"] == "ok"
    rec = _records(keepalive_gateway)[0]
    assert rec["decision_id"] == sg["decision_id"] and rec["chosen_text"] == text
    # the request's max_tokens bound every candidate
    assert all(c["completion_tokens"] <= 12 for c in rec["candidates"])
