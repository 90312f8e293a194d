"""Log-likelihood and raw completions against a vLLM-shaped server (issue 20, item 3).

vLLM cannot run on this CPU, so :class:`VLLMServerDouble` stands in for it. It is a test
double, not vLLM: it replays the response shapes of vLLM's OpenAI-compatible server as
declared in ``vllm/entrypoints/openai/protocol.py`` (vllm-project/vllm, commit
0052bed36509c7a5a2d8e48265334e40cf2f5a0e):

- ``TokenizeChatRequest`` / ``TokenizeCompletionRequest`` -> ``TokenizeResponse``
  ``{count, max_model_len, tokens, token_strs}`` on ``POST /tokenize``;
- ``CompletionRequest`` (``prompt`` as token ids, ``echo``, ``logprobs``, the
  ``prompt_logprobs`` extra parameter) -> ``CompletionResponse`` whose choice carries
  ``logprobs`` as ``CompletionLogProbs`` ``{text_offset, token_logprobs, tokens,
  top_logprobs}`` and ``prompt_logprobs`` as ``list[dict[int, Logprob] | None]`` (JSON keys
  are the token ids as strings; ``Logprob`` = ``{logprob, rank, decoded_token}``), the first
  entry ``None``; with ``echo`` the prompt tokens lead ``token_logprobs`` (the first ``None``);
- no llama.cpp endpoints: ``/apply-template`` is a 404.

Its tokenizer and its model are toys with a closed form, so expected values are computed
here independently: a chat renders as ids ``[1, 2, 10 + len(content) per message, (4 for the
generation prompt)]``, text tokenises one id per character (``ord``), and the model gives
token ``t`` at position ``i`` the log-probability ``-(0.01 * t + 0.001 * i)``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from safetygame.backends.base import Message
from safetygame.backends.openai_compat import OpenAICompatBackend, RetryPolicy
from safetygame.errors import BackendProtocolError, BackendUnsupported


def toy_logprob(token: int, position: int) -> float:
    return -(0.01 * token + 0.001 * position)


class VLLMServerDouble:
    """Test double of a vLLM OpenAI-compatible server (shapes from vLLM's protocol.py).

    ``prompt_logprobs``: answers vLLM's ``prompt_logprobs`` extension; ``echo``: honours
    ``echo`` (prompt tokens lead ``logprobs``); ``tokenize``: serves ``/tokenize``.
    """

    def __init__(
        self, *, prompt_logprobs: bool = True, echo: bool = True, tokenize: bool = True
    ) -> None:
        self.prompt_logprobs = prompt_logprobs
        self.echo = echo
        self.tokenize = tokenize
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.bad_entry = False

    def backend(self) -> OpenAICompatBackend:
        return OpenAICompatBackend(
            "http://vllm.invalid/v1",
            model="toy",
            transport=httpx.MockTransport(self),
            retry=RetryPolicy(max_retries=0),
        )

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.url.path, body))
        if request.url.path == "/tokenize" and self.tokenize:
            return self._tokenize(body)
        if request.url.path == "/v1/completions":
            return self._complete(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def _tokenize(self, body: dict[str, Any]) -> httpx.Response:
        if "messages" in body:
            ids = [1, 2] + [10 + len(m["content"]) for m in body["messages"]]
            if body.get("add_generation_prompt", True):
                ids.append(4)
        else:
            ids = [ord(c) for c in body["prompt"]]
        return httpx.Response(
            200,
            json={"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": None},
        )

    def _complete(self, body: dict[str, Any]) -> httpx.Response:
        prompt = body["prompt"]
        assert isinstance(prompt, list), "the double expects token ids"
        generated = 7  # the one token it "generates" (max_tokens=1)
        choice: dict[str, Any] = {
            "index": 0,
            "text": "\x07",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        if body.get("logprobs") is not None:
            tokens = [chr(t) for t in prompt] if self.echo and body.get("echo") else []
            values: list[float | None] = [
                None if i == 0 else toy_logprob(t, i) for i, t in enumerate(prompt)
            ][: len(tokens)]
            tops: list[dict[str, float] | None] = [
                None if v is None else {chr(prompt[i]): v} for i, v in enumerate(values)
            ]
            gen_lp = toy_logprob(generated, len(prompt))
            choice["logprobs"] = {
                "text_offset": list(range(len(tokens) + 1)),
                "token_logprobs": [*values, gen_lp],
                "tokens": [*tokens, chr(generated)],
                "top_logprobs": [*tops, {chr(generated): gen_lp}],
            }
        if self.prompt_logprobs and body.get("prompt_logprobs") is not None:
            entries: list[dict[str, Any] | None] = [None]
            for i, t in enumerate(prompt[1:], start=1):
                key = str(t + 1 if self.bad_entry else t)
                entry = {key: {"logprob": toy_logprob(t, i), "rank": 2, "decoded_token": chr(t)}}
                entry["0"] = {"logprob": -0.0001, "rank": 1, "decoded_token": "\x00"}
                entries.append(entry)
            choice["prompt_logprobs"] = entries
        usage = {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + 1}
        usage["completion_tokens"] = 1
        return httpx.Response(
            200,
            json={
                "id": "cmpl-double",
                "object": "text_completion",
                "created": 0,
                "model": "toy",
                "choices": [choice],
                "usage": usage,
            },
        )


CHAT = [Message("user", "Capital of France?")]


def expected(chat_ids: list[int], continuation: str) -> float:
    cont = [ord(c) for c in continuation]
    return sum(toy_logprob(t, len(chat_ids) + k) for k, t in enumerate(cont))


async def test_loglik_through_prompt_logprobs() -> None:
    double = VLLMServerDouble()
    backend = double.backend()
    r = await backend.loglik(CHAT, " Paris")
    assert r.n_tokens == 6
    assert r.logprob == pytest.approx(expected([1, 2, 10 + 18, 4], " Paris"))
    sent = [b for p, b in double.requests if p == "/v1/completions"]
    assert sent[0]["prompt_logprobs"] == 1 and "echo" not in sent[0]
    assert sent[0]["prompt"] == [1, 2, 28, 4, *(ord(c) for c in " Paris")]
    assert sent[0]["model"] == "toy"

    # detection is cached: no second llama.cpp probe, no second try of anything
    double.requests.clear()
    await backend.loglik(CHAT, " Lyon")
    assert double.paths() == ["/tokenize", "/tokenize", "/v1/completions"]


async def test_loglik_continues_a_prefilled_assistant_message() -> None:
    double = VLLMServerDouble()
    chat = [*CHAT, Message("assistant", "It is")]
    r = await double.backend().loglik(chat, " Paris")
    assert r.logprob == pytest.approx(expected([1, 2, 28, 15], " Paris"))
    chat_req = next(b for p, b in double.requests if p == "/tokenize" and "messages" in b)
    assert chat_req["continue_final_message"] is True
    assert chat_req["add_generation_prompt"] is False
    text_req = next(b for p, b in double.requests if p == "/tokenize" and "prompt" in b)
    assert text_req["add_special_tokens"] is False


async def test_loglik_falls_back_to_echo() -> None:
    double = VLLMServerDouble(prompt_logprobs=False)
    backend = double.backend()
    r = await backend.loglik(CHAT, " Paris")
    assert r.logprob == pytest.approx(expected([1, 2, 28, 4], " Paris"))
    tried = [b for p, b in double.requests if p == "/v1/completions"]
    assert [("prompt_logprobs" in b, b.get("echo")) for b in tried] == [(True, None), (False, True)]

    double.requests.clear()
    await backend.loglik(CHAT, " Lyon")
    (only,) = [b for p, b in double.requests if p == "/v1/completions"]
    assert only["echo"] is True and only["logprobs"] == 1


async def test_a_server_with_neither_feature_is_unsupported_and_says_which() -> None:
    double = VLLMServerDouble(prompt_logprobs=False, echo=False)
    backend = double.backend()
    with pytest.raises(BackendUnsupported, match=r"prompt_logprobs.*echo") as info:
        await backend.loglik(CHAT, " Paris")
    assert "llama.cpp" in str(info.value)
    double.requests.clear()
    with pytest.raises(BackendUnsupported, match="has neither"):
        await backend.loglik(CHAT, " Paris")
    assert "/v1/completions" not in double.paths()  # the answer was cached


async def test_a_server_that_cannot_tokenize_chats_is_unsupported() -> None:
    double = VLLMServerDouble(tokenize=False)
    with pytest.raises(BackendUnsupported, match="/tokenize"):
        await double.backend().loglik(CHAT, " Paris")


async def test_a_prompt_logprob_entry_without_the_prompt_token_is_a_protocol_error() -> None:
    double = VLLMServerDouble()
    double.bad_entry = True
    with pytest.raises(BackendProtocolError, match="prompt token 1"):
        await double.backend().loglik(CHAT, " Paris")


class LegacyCompletionsDouble:
    """Test double: /v1/completions answering with ``logprobs`` in vLLM's
    ``CompletionLogProbs`` shape (protocol.py above) for a raw text prompt."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.payloads.append(body)
        logprobs = {
            "text_offset": [0, 2],
            "token_logprobs": [-0.01, -0.2],
            "tokens": ["\n\n", "unsafe"],
            "top_logprobs": [{"\n\n": -0.01, "\n": -4.7}, {"unsafe": -0.2, "safe": -1.7}],
        }
        choice = {"index": 0, "text": "\n\nunsafe", "logprobs": logprobs}
        choice["finish_reason"] = "length"
        return httpx.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": 9}})


async def test_complete_logprobs_reads_the_legacy_completions_shape() -> None:
    double = LegacyCompletionsDouble()
    backend = OpenAICompatBackend("http://vllm.invalid", transport=httpx.MockTransport(double))
    out = await backend.complete_logprobs("PROMPT", max_tokens=2, top_logprobs=20)
    assert [c.token for c in out] == ["\n\n", "unsafe"]
    assert dict(out[1].top) == {"unsafe": -0.2, "safe": -1.7}
    assert double.payloads[0] == {
        "prompt": "PROMPT",
        "max_tokens": 2,
        "temperature": 0,
        "logprobs": 20,
    }


async def test_complete_logprobs_on_a_server_without_either_endpoint_is_unsupported() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    backend = OpenAICompatBackend("http://none.invalid", transport=httpx.MockTransport(handler))
    with pytest.raises(BackendUnsupported, match=r"/v1/completions.*n_probs"):
        await backend.complete_logprobs("PROMPT")
