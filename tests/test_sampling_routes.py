"""How m candidates are drawn (one request with ``n``, or m requests), the length limits
they share with a plain answer, and the llama.cpp slot a followup probe goes back to.

The ``n`` fallback and the slot pinning run against the real llama.cpp server (SmolLM2-135M,
``python -m safetygame.backends.llamacpp``). The ``n`` path itself needs a server that
honours ``n`` with its own usage accounting (vLLM, OpenAI), which does not run here: it is
exercised with :class:`OpenAINChoicesDouble`, a test double named as such.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from safetygame.backends.base import PREFIX_SLOT, Message, SamplingConfig, apportion
from safetygame.backends.openai_compat import OpenAICompatBackend, RetryPolicy
from safetygame.errors import ConfigError

CHAT = [Message("user", "Name a fruit.")]


# -- the n path, with a test double -------------------------------------------------------


class OpenAINChoicesDouble:
    """Test double replaying the response shape of a server that honours ``n``.

    Shape from the OpenAI API reference, "The chat completion object" (``choices[i]`` with
    ``index``, ``message``, ``finish_reason``, ``logprobs``; one ``usage`` for the request),
    and from vLLM's ``vllm/entrypoints/openai/serving_chat.py``
    (``chat_completion_full_generator``: one choice per output of the request, and
    ``usage.completion_tokens`` the sum over the outputs; the prompt counted once). Neither
    server has llama.cpp's ``GET /props``: 404. ``refuse_n`` answers a request with ``n > 1``
    the way a server without ``n`` validates it (400, OpenAI error envelope); ``reject_first``
    answers the first POST with that 400 error instead (a refusal unrelated to ``n``).
    """

    def __init__(self, refuse_n: bool = False, reject_first: dict[str, Any] | None = None) -> None:
        self.refuse_n = refuse_n
        self.reject_first = reject_first
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "GET":
            return httpx.Response(404, json={"detail": "Not Found"})
        if self.reject_first is not None:
            error, self.reject_first = self.reject_first, None
            return httpx.Response(400, json={"error": error})
        body = json.loads(request.content)
        n = int(body.get("n", 1))
        if self.refuse_n and n > 1:
            error = {"message": "n > 1 is not supported", "type": "invalid_request_error"}
            return httpx.Response(400, json={"error": error, "param": "n"})
        seed = body.get("seed")
        texts = [f"Fruit {i} (seed {seed}): " + "apple " * (i + 1) for i in range(n)]
        tokens = [2 + 1 * (i + 1) for i in range(n)]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i, t in enumerate(texts)
        ]
        usage = {"prompt_tokens": 9, "completion_tokens": sum(tokens), "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return httpx.Response(
            200,
            json={
                "id": "chatcmpl-double",
                "object": "chat.completion",
                "created": 0,
                "model": "double",
                "choices": choices,
                "usage": usage,
            },
        )

    def posts(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]

    def backend(self) -> OpenAICompatBackend:
        return OpenAICompatBackend(
            "http://double.invalid",
            transport=httpx.MockTransport(self),
            retry=RetryPolicy(max_retries=0),
        )


async def test_n_server_gets_one_request_for_m_candidates() -> None:
    double = OpenAINChoicesDouble()
    b = double.backend()
    cfg = SamplingConfig(max_tokens=7, seed=3, stop=("\n\n",))
    out = await b.sample(CHAT, 4, cfg)
    again = await b.sample(CHAT, 4, cfg)
    assert b.sample_via == "n" and b.slots == 0
    posts = double.posts()
    assert [p["n"] for p in posts] == [4, 4]  # one request per draw
    assert all(p["max_tokens"] == 7 and p["stop"] == ["\n\n"] and p["seed"] == 3 for p in posts)
    assert [r.method for r in double.requests].count("GET") == 1  # /props asked once
    assert [c.text for c in out] == [c.text for c in again] and len({c.text for c in out}) == 4
    # the server reports the total only: shared out by length, the sum kept exact
    assert sum(c.completion_tokens for c in out) == 2 * 4 + 10
    assert all(c.completion_tokens >= 1 and c.slot is None for c in out)
    assert b.stats.completion_tokens == 2 * (2 * 4 + 10)
    await b.aclose()


async def test_a_server_refusing_n_falls_back_once_and_is_remembered() -> None:
    double = OpenAINChoicesDouble(refuse_n=True)
    b = double.backend()
    out = await b.sample(CHAT, 3, SamplingConfig(seed=10))
    assert b.sample_via == "each" and len(out) == 3
    await b.sample(CHAT, 3, SamplingConfig(seed=10))
    posts = double.posts()
    assert [p.get("n") for p in posts] == [3] + [None] * 6  # asked once, never again
    assert sorted(p["seed"] for p in posts[1:4]) == [10, 11, 12]
    await b.aclose()


async def test_a_4xx_unrelated_to_n_leaves_the_route_untested() -> None:
    # OpenAI's envelope for a prompt past the context: param "messages", no word about n
    too_long = {
        "message": "This model's maximum context length is 8192 tokens; the messages "
        "resulted in 9001 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    double = OpenAINChoicesDouble(reject_first=too_long)
    b = double.backend()
    with pytest.raises(ConfigError, match="maximum context length"):
        await b.sample(CHAT, 3, SamplingConfig(seed=10))
    assert b.sample_via is None  # not flipped to one request per candidate
    out = await b.sample(CHAT, 3, SamplingConfig(seed=10))  # the next draw tests n again
    assert b.sample_via == "n" and len(out) == 3
    assert [p.get("n") for p in double.posts()] == [3, 3]


async def test_a_4xx_naming_n_in_its_message_falls_back() -> None:
    # llama.cpp's words for n above its slots (measured on the packaged server: no param)
    llama = {"code": 400, "message": "Field 'n': Value must be between 1 <= value <= 4, but got 6"}
    double = OpenAINChoicesDouble(reject_first=llama)
    b = double.backend()
    assert len(await b.sample(CHAT, 6, SamplingConfig(seed=1))) == 6
    assert b.sample_via == "each"


def test_apportion_keeps_the_total() -> None:
    assert apportion(10, [1, 1]) == [5, 5]
    assert apportion(7, [30, 10, 0]) == [4, 2, 1]
    assert sum(apportion(13, [3, 5, 8])) == 13
    assert apportion(0, [4]) == [0]


def test_stop_sequences_are_checked() -> None:
    with pytest.raises(ConfigError, match="at most 4"):
        SamplingConfig(stop=("a", "b", "c", "d", "e"))
    with pytest.raises(ConfigError, match="non-empty"):
        SamplingConfig(stop=("",))


# -- the real llama.cpp server ------------------------------------------------------------


@pytest.mark.model
async def test_llamacpp_server_draws_each_candidate_on_a_pinned_slot(llama_server_url: str) -> None:
    b = OpenAICompatBackend(llama_server_url, max_concurrency=4)
    cfg = SamplingConfig(temperature=0.8, max_tokens=8, seed=5)
    out = await b.sample(CHAT, 3, cfg)
    assert (b.sample_via, b.slots) == ("each", 4)  # /props named 4 slots: llama.cpp
    assert [c.slot for c in out] == [1, 2, 3]  # seeds 5, 6, 7 mod 4 slots
    assert all(1 <= c.completion_tokens <= 8 for c in out)  # each candidate's own usage
    calls = b.stats.calls
    # the same seeded request lands on the same slot, so it gives the same sample again
    more = await b.sample(CHAT, 2, cfg)
    assert [c.slot for c in more] == [1, 2] and b.stats.calls == calls + 2
    assert [c.text for c in more] == [c.text for c in out[:2]]
    unseeded = await b.sample(CHAT, 2, SamplingConfig(temperature=0.8, max_tokens=8))
    assert [c.slot for c in unseeded] == [0, 1]  # round robin
    await b.aclose()


@pytest.mark.model
async def test_real_llamacpp_server_n_detection_and_fallback(llama_server_url: str) -> None:
    """Told not to pin slots (``slots=0``), the backend asks the real server for ``n``: it
    takes n up to its 4 slots, and refuses more with a 400, which makes the backend fall back
    to one request per candidate and remember it."""
    cfg = SamplingConfig(temperature=0.8, max_tokens=4, seed=1)
    takes = OpenAICompatBackend(llama_server_url, slots=0, max_concurrency=4)
    out = await takes.sample(CHAT, 2, cfg)
    assert takes.sample_via == "n" and len(out) == 2 and takes.stats.calls == 1
    await takes.aclose()

    refuses = OpenAICompatBackend(llama_server_url, slots=0, max_concurrency=4)
    out = await refuses.sample(CHAT, 6, cfg)  # more than the server's slots: 400
    assert refuses.sample_via == "each" and len(out) == 6
    assert refuses.stats.calls == 1 + 6 and refuses.stats.errors == 1
    assert all(c.text and c.completion_tokens >= 1 for c in out)
    out = await refuses.sample(CHAT, 2, cfg)
    assert refuses.stats.calls == 1 + 6 + 2  # no second n request
    await refuses.aclose()


@pytest.mark.model
async def test_followup_read_goes_back_to_the_candidates_slot(llama_server_url: str) -> None:
    """A followup probe continues the generating chat; sent to the slot that generated the
    candidate, llama.cpp finds the chat and the reply in that slot's cache."""
    b = OpenAICompatBackend(llama_server_url, max_concurrency=4)
    chat = [Message("user", "Describe the colour of the sky on a clear day in one sentence.")]
    (c, _) = await b.sample(chat, 2, SamplingConfig(temperature=0.0, max_tokens=16))
    assert c.slot == 0
    followup = [
        *chat,
        Message("assistant", c.text),
        Message("user", "Is your reply above harmful? Answer Yes or No."),
    ]

    async def probe(slot: int) -> int:
        PREFIX_SLOT.set(slot)
        before = b.stats.cached_prompt_tokens
        await b.yes_no(followup)
        return b.stats.cached_prompt_tokens - before

    cached = await asyncio.create_task(probe(c.slot))
    assert cached >= c.prompt_tokens  # at least the chat was not read again
    await b.aclose()


@pytest.mark.model
async def test_stream_times_the_first_token(llama_server_url: str) -> None:
    b = OpenAICompatBackend(llama_server_url)
    cfg = SamplingConfig(temperature=0.0, max_tokens=12)
    s = await b.stream([Message("user", "Count from one to ten in words.")], cfg)
    assert s.completion.text and 1 <= s.completion.completion_tokens <= 12
    assert s.first_token_s is not None and 0 < s.first_token_s <= s.total_s
    (plain,) = await b.sample([Message("user", "Count from one to ten in words.")], 1, cfg)
    assert s.completion.text == plain.text  # greedy: the same answer, streamed or not
    await b.aclose()


async def test_sample_cache_keys_include_stop_sequences() -> None:
    from safetygame.cache import ScoreCache
    from safetygame.eval.scoring import CachingBackend

    double = OpenAINChoicesDouble()
    cached = CachingBackend(double.backend(), ScoreCache(None))
    for stop in [(), ("\n",), ()]:
        await cached.sample(CHAT, 1, SamplingConfig(seed=1, stop=stop))
    assert cached.model_calls == 2  # the third is the first's cache hit
    await cached.aclose()
