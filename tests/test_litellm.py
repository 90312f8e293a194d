"""The LiteLLM guardrail's hooks called directly, on LiteLLM's own response type (no model).

The failure paths: a judge where nothing listens, an upstream that returned no choice, and
requests the pre-call hook must refuse or complete. The model-backed run through a real
proxy is tests/test_litellm_model.py.
"""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
litellm = pytest.importorskip("litellm")
fastapi = pytest.importorskip("fastapi")

from safetygame.errors import ConfigError  # noqa: E402
from safetygame.integrations.litellm import (  # noqa: E402
    SafetyGameGuardrail,
    chat_of,
    completions_of,
)
from safetygame.policy import load_policy  # noqa: E402

CHAT = [{"role": "user", "content": "Name a colour."}]


def dead_url() -> str:
    with socket.socket() as sock:  # free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def response(*texts: str) -> object:
    return litellm.ModelResponse(
        model="m",
        choices=[
            {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
            for i, t in enumerate(texts)
        ],
    )


def guardrail(**kwargs: object) -> SafetyGameGuardrail:
    return SafetyGameGuardrail(api_base=kwargs.pop("api_base", dead_url()), fill=False, **kwargs)


async def test_pre_call_asks_for_the_policy_candidates_unless_the_request_set_them() -> None:
    g = guardrail()
    s = load_policy().sampling
    data = await g.async_pre_call_hook(None, None, {"messages": CHAT}, "completion")
    assert data is not None
    assert (data["n"], data["temperature"], data["top_p"], data["max_tokens"]) == (
        s.n, s.temperature, s.top_p, s.max_tokens,
    )  # fmt: skip
    mine = {"messages": CHAT, "n": 1, "temperature": 0.3, "max_completion_tokens": 5}
    data = await g.async_pre_call_hook(None, None, mine, "completion")
    assert data is not None
    assert (data["n"], data["temperature"], data.get("max_tokens")) == (1, 0.3, None)


async def test_pre_call_refuses_streams_and_chats_the_game_cannot_take() -> None:
    g = guardrail()
    with pytest.raises(fastapi.HTTPException) as err:
        await g.async_pre_call_hook(None, None, {"messages": CHAT, "stream": True}, "completion")
    assert err.value.status_code == 400
    tool = [*CHAT, {"role": "tool", "content": "42", "tool_call_id": "1"}]
    with pytest.raises(fastapi.HTTPException, match="'tool'"):
        await g.async_pre_call_hook(None, None, {"messages": tool}, "completion")


async def test_an_unreachable_judge_fails_closed_with_the_refusal() -> None:
    g = guardrail()
    out = await g.async_post_call_success_hook({"messages": CHAT}, None, response("Blue.", "Red."))
    assert [c.message.content for c in out.choices] == [load_policy().refusal]
    meta = out.safetygame
    assert (meta["status"], meta["action"]) == ("scoring_failed", "refuse")
    assert (meta["choices_returned"], meta["choices_drawn"]) == (2, 2)


async def test_no_choice_at_all_fails_closed() -> None:
    out = await guardrail().async_post_call_success_hook({"messages": CHAT}, None, response())
    assert out.choices[0].message.content == load_policy().refusal
    assert out.safetygame["action"] == "refuse"
    assert "no choice" in out.safetygame["reason"]


async def test_other_responses_pass_untouched() -> None:
    emb = litellm.EmbeddingResponse(model="m", data=[])
    assert await guardrail().async_post_call_success_hook({}, None, emb) is emb


def test_configuration_errors_stop_start_up() -> None:
    with pytest.raises(ConfigError, match="api_base"):
        SafetyGameGuardrail()
    with pytest.raises(ConfigError, match="exceeds the policy's budget"):
        guardrail(budget=0.9)
    with pytest.raises(ConfigError, match="Unknown policy"):
        guardrail(policy="no-such-policy")
    with pytest.raises(ConfigError, match=r"mode: \[pre_call, post_call\]"):
        guardrail(event_hook="post_call")  # streams would pass unguarded
    assert guardrail(event_hook=["pre_call", "post_call"]).event_hook == ["pre_call", "post_call"]


def test_request_and_response_shapes() -> None:
    parts = [{"type": "text", "text": "Hi "}, {"type": "image_url", "image_url": {}}]
    chat = chat_of(
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    )
    assert [(m.role, m.content) for m in chat] == [("system", "Be brief."), ("user", "Hi ")]
    with pytest.raises(ConfigError, match="last message"):
        chat_of([*CHAT, {"role": "assistant", "content": "Blue."}])
    assert [c.text for c in completions_of(response("a", "b"))] == ["a", "b"]
