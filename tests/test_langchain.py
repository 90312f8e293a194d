"""The LangChain wrapper (issue 20, item 5) around a real small model.

The inner chat model is langchain-openai's ``ChatOpenAI`` pointed at the llama.cpp server
fixture serving SmolLM2-135M; the judge is either a safetygame backend on the same server or
the inner model itself. No fake LLM: the failure test points ``ChatOpenAI`` at a port where
nothing listens.
"""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("langchain_core")
langchain_openai = pytest.importorskip("langchain_openai")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402

from safetygame.backends.openai_compat import OpenAICompatBackend  # noqa: E402
from safetygame.errors import ConfigError  # noqa: E402
from safetygame.integrations.langchain import SafetyGameChat  # noqa: E402
from safetygame.policy import load_policy  # noqa: E402

pytestmark = pytest.mark.model


def inner_model(url: str, **kwargs: object) -> object:
    return langchain_openai.ChatOpenAI(
        base_url=f"{url}/v1",
        api_key="not-needed",
        model="smollm2-135m",
        temperature=0.8,
        max_tokens=32,
        **kwargs,
    )


async def test_answers_through_the_game_with_a_safetygame_judge(llama_server_url: str) -> None:
    judge = OpenAICompatBackend(llama_server_url, model_id="smollm2-135m")
    chat = SafetyGameChat(inner=inner_model(llama_server_url), judge=judge)
    msg = await chat.ainvoke(
        [
            SystemMessage("You are a helpful assistant."),
            HumanMessage("What is the capital of France?"),
        ]
    )
    assert isinstance(msg, AIMessage) and isinstance(msg.content, str) and msg.content
    meta = msg.response_metadata["safetygame"]
    assert meta["status"] == "ok"
    assert meta["action"] in ("answer", "refuse")
    assert len(meta["strategy"]) == load_policy().sampling.n + 1  # candidates + the refusal
    assert meta["policy_id"] == "default"
    if meta["action"] == "refuse":
        assert msg.content == load_policy().refusal
    await judge.aclose()


def test_the_inner_model_can_be_its_own_judge_from_its_logprobs(llama_server_url: str) -> None:
    # every probe is a full reply of the inner model here: two candidates keep it short
    pol = load_policy()
    pol = pol.model_copy(update={"sampling": pol.sampling.model_copy(update={"n": 2})})
    inner = inner_model(llama_server_url, logprobs=True, top_logprobs=20)
    msg = SafetyGameChat(inner=inner, policy=pol).invoke("Name a colour of the sky.")
    meta = msg.response_metadata["safetygame"]
    assert meta["status"] == "ok", meta["reason"]
    assert len(meta["strategy"]) == 3
    assert isinstance(msg.content, str) and msg.content


def test_sync_calls_in_a_row_reuse_the_inner_model(llama_server_url: str) -> None:
    # invoke runs each decision on a fresh event loop; the inner model must survive that
    # (its async client is bound to its first loop, so sync callers use its sync API).
    pol = load_policy()
    pol = pol.model_copy(update={"sampling": pol.sampling.model_copy(update={"n": 1})})
    judge = OpenAICompatBackend(llama_server_url, model_id="smollm2-135m")
    chat = SafetyGameChat(inner=inner_model(llama_server_url), judge=judge, policy=pol)
    for question in ("Name a fruit.", "Name a planet."):
        meta = chat.invoke(question).response_metadata["safetygame"]
        assert meta["status"] == "ok", meta["reason"]


def test_an_unreachable_inner_model_fails_closed_with_the_refusal() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inner = inner_model(f"http://127.0.0.1:{port}", max_retries=0, timeout=5)
    msg = SafetyGameChat(inner=inner).invoke("Hello?")
    meta = msg.response_metadata["safetygame"]
    assert msg.content == load_policy().refusal
    assert (meta["status"], meta["action"]) == ("generation_failed", "refuse")
    assert "inner chat model failed" in meta["reason"]


def test_requests_the_game_cannot_take_raise() -> None:
    chat = SafetyGameChat(inner=inner_model("http://127.0.0.1:9"))
    with pytest.raises(ConfigError, match="last message"):
        chat.invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(ConfigError, match="tool"):
        chat.invoke([ToolMessage("result", tool_call_id="1")])
