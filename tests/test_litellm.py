"""The LiteLLM guardrail's hooks called directly, on LiteLLM's own response type (no model).

The failure paths: a judge where nothing listens, an upstream that returned no choice, and
requests the pre-call hook must refuse or complete. The model-backed run through a real
proxy is tests/test_litellm_model.py.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
litellm = pytest.importorskip("litellm")
fastapi = pytest.importorskip("fastapi")

from safetygame.bench.gateway import LoopbackUpstream, upstream_in_thread  # noqa: E402
from safetygame.errors import ConfigError  # noqa: E402
from safetygame.integrations.litellm import (  # noqa: E402
    SafetyGameGuardrail,
    chat_of,
    completions_of,
    router_filler,
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
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    with pytest.raises(fastapi.HTTPException, match=r"content\[1\].*'image_url'") as err:
        await g.async_pre_call_hook(None, None, {"messages": parts}, "acompletion")
    assert err.value.status_code == 400


async def test_pre_call_refuses_tools() -> None:
    g = guardrail()
    fn = {"name": "lookup", "parameters": {"type": "object", "properties": {}}}
    for extra in (
        {"tools": [{"type": "function", "function": fn}]},
        {"functions": [fn]},
        {"tool_choice": "auto"},
    ):
        with pytest.raises(fastapi.HTTPException, match="tool call") as err:
            await g.async_pre_call_hook(None, None, {"messages": CHAT, **extra}, "acompletion")
        assert err.value.status_code == 400 and repr(next(iter(extra))) in err.value.detail


@pytest.mark.parametrize(
    "call_type",
    [
        "atext_completion",
        "text_completion",
        "aresponses",
        "anthropic_messages",
        "aimage_generation",
    ],
)
async def test_pre_call_refuses_every_other_generating_call(call_type: str) -> None:
    data = {"model": "m", "prompt": "Write a poem about a knife."}
    with pytest.raises(fastapi.HTTPException, match="chat completions only") as err:
        await guardrail().async_pre_call_hook(None, None, data, call_type)
    assert err.value.status_code == 400 and repr(call_type) in err.value.detail


async def test_pre_call_lets_non_generating_calls_through() -> None:
    from litellm.types.utils import CallTypes

    for call_type in ("aembedding", "embedding", CallTypes.amoderation, "arerank"):
        data = {"model": "m", "input": ["a knife"]}
        assert await guardrail().async_pre_call_hook(None, None, data, call_type) is data
        assert "n" not in data


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


async def test_non_generated_responses_pass_untouched() -> None:
    emb = litellm.EmbeddingResponse(model="m", data=[])
    assert await guardrail().async_post_call_success_hook({}, None, emb) is emb


async def test_a_generated_response_that_is_not_a_chat_gets_the_refusal() -> None:
    text = litellm.TextCompletionResponse(
        model="m", choices=[{"index": 0, "text": "Step 1: sharpen", "finish_reason": "stop"}]
    )
    out = await guardrail().async_post_call_success_hook({"prompt": "x"}, None, text)
    assert isinstance(out, litellm.ModelResponse)
    assert [c.message.content for c in out.choices] == [load_policy().refusal]
    assert (out.safetygame["status"], out.safetygame["action"]) == ("error", "refuse")
    assert "TextCompletionResponse" in out.safetygame["reason"]


async def test_the_answer_is_rebuilt_from_the_chosen_text() -> None:
    # Choices with text *and* a tool call (an upstream that ignored the pre-call rule): the
    # client gets the chosen text alone, never the upstream choice with its tool call. The
    # judge is the loopback OpenAI-compatible server (a real HTTP peer, fixed P(yes) per
    # prompt); with these texts the game answers with the second choice.
    fn = {"name": "lookup", "arguments": "{}"}
    upstream = litellm.ModelResponse(
        model="m",
        choices=[
            {
                "index": i,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [{"id": f"c{i}", "type": "function", "function": fn}],
                },
            }
            for i, text in enumerate(["Green.", "Teal."])
        ],
    )
    with upstream_in_thread(latency=0.0) as judge:
        g = guardrail(api_base=judge.url)
        out = await g.async_post_call_success_hook({"messages": CHAT}, None, upstream)
        await g.judge.aclose()
    assert (out.safetygame["action"], out.safetygame["chosen_index"]) == ("answer", 2)
    (choice,) = out.choices
    assert choice.message.content == "Teal." and choice.message.tool_calls is None
    assert (choice.index, choice.finish_reason) == (0, "stop")


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
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    chat = chat_of(
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    )
    assert [(m.role, m.content) for m in chat] == [("system", "Be brief."), ("user", "Hi there")]
    # a part the judge would not see is refused, not dropped
    image = [{"type": "text", "text": "Hi "}, {"type": "image_url", "image_url": {}}]
    with pytest.raises(ConfigError, match=r"messages\[0\]\.content\[1\].*'image_url'"):
        chat_of([{"role": "user", "content": image}])
    with pytest.raises(ConfigError, match="last message"):
        chat_of([*CHAT, {"role": "assistant", "content": "Blue."}])
    reply = response("a", "bbb")
    reply.usage = litellm.Usage(prompt_tokens=5, completion_tokens=8, total_tokens=13)
    out = completions_of(reply)
    assert [c.text for c in out] == ["a", "bbb"]
    assert [c.completion_tokens for c in out] == [2, 6]  # shared out by length, as apportion()


class RecordingUpstream(LoopbackUpstream):
    """The loopback OpenAI-compatible server (a real HTTP peer) that keeps each request body."""

    def __init__(self) -> None:
        super().__init__(latency=0.0)
        self.bodies: list[dict[str, object]] = []

    async def _respond(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "POST":
            self.bodies.append(json.loads(body))
        return await super()._respond(method, path, body)


async def test_fill_ups_keep_the_request_sampling_constraints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy_server = pytest.importorskip("litellm.proxy.proxy_server")
    up = RecordingUpstream()
    await up.start()
    try:
        deployment = {"model": "openai/loopback", "api_base": f"{up.url}/v1", "api_key": "none"}
        router = litellm.Router(model_list=[{"model_name": "m", "litellm_params": deployment}])
        monkeypatch.setattr(proxy_server, "llm_router", router)
        data = {
            "model": "m",
            "messages": CHAT,
            "n": 4,
            "temperature": 0.3,
            "top_p": 0.9,
            "max_tokens": 7,
            "stop": ["\n\n", "END"],
            "presence_penalty": 0.5,
            "seed": 10,
        }
        got = await router_filler(data)(2)
    finally:
        await up.stop()
    assert [c.text for c in got] == ["Loopback reply 11.", "Loopback reply 12."]
    assert len(up.bodies) == 2
    for body in up.bodies:
        assert body["stop"] == ["\n\n", "END"] and body.get("n", 1) == 1
        assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 7)
        assert body["presence_penalty"] == 0.5
    assert sorted(b["seed"] for b in up.bodies) == [11, 12]  # its own seed per fill-up
